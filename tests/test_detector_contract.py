"""Every registered detector obeys the protocol: sign, shapes, and clear errors on bad input.

New detectors are picked up automatically from the registry; nothing here names a method.
"""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope.detectors import NotFittedError, get_detector_class

from conftest import make_detector, synthetic_detector_names

NAMES = synthetic_detector_names()


def test_registry_has_the_promised_breadth():
    assert len(ood.list_detectors()) >= 30, ood.list_detectors()


def test_unknown_detector_suggests_names():
    with pytest.raises(ValueError, match="Unknown detector"):
        ood.create("mahalanobsi")


def test_unknown_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match="no hyperparameter"):
        ood.create(NAMES[0], definitely_not_a_param=1)


@pytest.mark.parametrize("name", NAMES)
def test_sign_far_ood(name, problem):
    """AUROC >= 0.95 on far-away OOD: fails if the score's sign is flipped."""
    reason = getattr(get_detector_class(name), "sign_test_exempt", None)
    if reason:
        pytest.skip(f"{name}: {reason} (its own test file checks its sign)")
    det = make_detector(name, problem).fit(problem.train)
    s_id, s_ood = det.score(problem.test_id), det.score(problem.test_ood)
    assert s_id.shape == (len(problem.test_id),) and s_ood.shape == (len(problem.test_ood),)
    assert s_id.dtype == np.float64
    assert ood.metrics.auroc(s_id, s_ood) >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_declares_metadata(name):
    cls = get_detector_class(name)
    assert cls.reference, f"{name} has no paper reference"
    for param, values in cls.search_space.items():
        assert param in cls._param_names(), f"{name}: search space names unknown param {param}"
        assert len(values) >= 1


@pytest.mark.parametrize("name", NAMES)
def test_score_before_fit(name, problem):
    with pytest.raises(NotFittedError):
        make_detector(name, problem).score(problem.test_id)


@pytest.mark.parametrize("name", NAMES)
def test_single_sample_and_clone(name, problem):
    det = make_detector(name, problem).fit(problem.train)
    one = det.score(problem.test_id[0])
    assert one.shape == (1,)
    batch = det.score(problem.test_id[:5])
    # scoring is per-sample: a sample's score does not depend on the rest of the batch
    np.testing.assert_allclose(one[0], batch[0], rtol=1e-5, atol=1e-6)
    clone = det.clone()
    assert not clone.is_fitted and clone.get_params().keys() == det.get_params().keys()


def _corrupt(f, field, value):
    f = f[:20]
    if field in ("logits", "features"):
        arr = getattr(f, field).copy()
        arr[3, 1] = value
        return f.replace(**{field: arr})
    arr = f.extras[field].copy()
    arr.reshape(len(arr), -1)[3, 1] = value
    return f.replace(extras={**f.extras, field: arr})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_raise(name, bad, problem):
    det = make_detector(name, problem)
    fields = [f for f in ("logits", "features", "inputs") if f in det.requires or f in det.fit_requirements()]
    det.fit(problem.train)
    for field in fields:
        if field in det.requires:
            with pytest.raises(ValueError, match="NaN or inf"):
                det.score(_corrupt(problem.test_id, field, bad))
        if field in det.fit_requirements():
            with pytest.raises(ValueError, match="NaN or inf"):
                make_detector(name, problem).fit(_corrupt(problem.train, field, bad))


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_raises(name, problem):
    det = make_detector(name, problem).fit(problem.train)
    with pytest.raises(ValueError):
        det.score(problem.test_id[:0])
    if det.fit_requirements():
        with pytest.raises(ValueError):
            make_detector(name, problem).fit(problem.train[:0])
        with pytest.raises(ValueError):
            make_detector(name, problem).fit(problem.train[:1])


@pytest.mark.parametrize("name", NAMES)
def test_wrong_width_raises(name, problem):
    det = make_detector(name, problem).fit(problem.train)
    x = problem.test_id[:10]
    for field in ("features", "logits"):
        if field not in det.requires or field not in det.fit_requirements():
            continue
        arr = getattr(x, field)
        wider = np.concatenate([arr, arr[:, :3]], axis=1)
        changes = {field: wider}
        if field == "features":
            changes.update(head_weight=None, head_bias=None)
            if "head" in det.requires:
                continue  # Features itself rejects a head that does not match
        else:
            changes.update(head_weight=None, head_bias=None)
            if "head" in det.requires:
                continue
        with pytest.raises(ValueError, match="width|match|dimension|shape"):
            det.score(x.replace(**changes))


@pytest.mark.parametrize("name", NAMES)
def test_missing_field_is_named(name, problem):
    det = make_detector(name, problem).fit(problem.train)
    for field in ("logits", "features"):
        if field in det.requires:
            with pytest.raises(ValueError, match=field):
                det.score(problem.test_id.replace(**{field: None}))


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_training_data_stays_finite(name, problem):
    """Constant features, a single class, rank deficiency: finite scores or a clear error."""
    base = problem.train
    n = len(base)
    cases = {
        "single_class": base[base.labels == 0],
        "rank_deficient": base.replace(features=np.concatenate(
            [base.features[:, :8], base.features[:, :8] * 2, np.zeros((n, base.features.shape[1] - 16))],
            axis=1).astype(np.float32)),
        "constant": base.replace(features=np.ones_like(base.features),
                                 logits=np.ones_like(base.logits)),
    }
    for case, train in cases.items():
        det = make_detector(name, problem)
        try:
            det.fit(train)
        except ValueError:
            continue  # a clear refusal is acceptable
        scores = det.score(problem.test_id[:50])
        assert np.all(np.isfinite(scores)), f"{name}/{case}: non-finite scores"


@pytest.mark.parametrize("name", [n for n in NAMES if "labels" in get_detector_class(n).fit_requirements()])
def test_labels_out_of_range_raise(name, problem):
    bad = problem.train.replace(labels=np.where(np.arange(len(problem.train)) == 0, 99, problem.train.labels))
    with pytest.raises(ValueError, match="out of range"):
        make_detector(name, problem).fit(bad)
    neg = problem.train.replace(labels=np.where(np.arange(len(problem.train)) == 0, -1, problem.train.labels))
    with pytest.raises(ValueError):
        make_detector(name, problem).fit(neg)


@pytest.mark.parametrize("name", [n for n in NAMES if "labels" in get_detector_class(n).fit_requirements()])
def test_mahalanobis_family_handles_feature_scale(name, problem):
    """Shrinkage must scale with the data: tiny or huge units give the same ranking quality."""
    for scale in (1e-4, 1e4):
        sc = lambda f: f.replace(features=(f.features * scale).astype(np.float32),  # noqa: E731
                                 head_weight=f.head_weight / scale)
        det = make_detector(name, problem).fit(sc(problem.train))
        auc = ood.metrics.auroc(det.score(sc(problem.test_id)), det.score(sc(problem.test_ood)))
        assert auc >= 0.95, f"{name} at feature scale {scale}: AUROC {auc:.3f}"
