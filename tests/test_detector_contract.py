"""Every registered detector obeys the protocol: sign, shapes, and clear errors on bad input.

New detectors are picked up automatically from the registry; nothing here names a method.
"""

from __future__ import annotations

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope.detectors import NotFittedError, get_detector_class

from conftest import make_detector, synthetic_detector_names
from detector_examples import fitted_example

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
def test_clone_is_unfitted_with_the_same_params(name, problem):
    det = make_detector(name, problem).fit(problem.train)
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


# =========================================================================== bad-input matrix
# Every registered detector (tests/detector_examples.py fits one of each), on the inputs a
# sweep found silently wrong numbers for: features in extreme units, all-zero features,
# float32 vs float64 copies of the same data, a batch vs its rows one by one. Where a
# detector legitimately differs, the tables below say so and why; a detector missing from
# a table gets the strict expectation.
ALL = ood.list_detectors()

#: Inputs that carry the units of the representation. A change of units multiplies them by
#: ``s`` and the head weight by ``1/s`` (so the head still maps features to the same logits);
#: logits, labels, temperatures and texts have no units and stay as they are.
UNIT_FIELDS = ("features", "image_embeds", "local_embeds", "inputs")

#: Not scale-invariant even in exact arithmetic: a change of units must give finite scores
#: that still vary, or a ValueError -- never a constant score.
NOT_SCALE_INVARIANT = {
    "odin": "runs the network on the rescaled inputs (a network is not scale-invariant)",
    "iodin": "runs the network on the rescaled inputs (a network is not scale-invariant)",
}

#: How a stateful detector's batch relates to its rows (checked by `_check_stream`).
STREAM_SEMANTICS = {
    "adaneg": "score(x) = score() of its consecutive blocks of stream_batch_size rows in turn",
}


def _reads_units(det) -> bool:
    need = set(det.requires) | set(det.fit_requirements())
    return bool(need & {*UNIT_FIELDS, "head"}) or any(n.startswith("layer:") for n in need)


def _rescaled(f, s: float):
    """The same Features in other units (computed in float64, stored in the original dtype)."""
    if f is None:
        return None

    def mul(a, factor):
        return (np.asarray(a, dtype=np.float64) * factor).astype(a.dtype)

    extras = {k: mul(v, s) if (k in UNIT_FIELDS or k.startswith("layer:")) and v.dtype.kind == "f" else v
              for k, v in f.extras.items()}
    changes = {"extras": extras}
    if f.features is not None:
        changes["features"] = mul(f.features, s)
    if f.head_weight is not None:
        changes["head_weight"] = mul(f.head_weight, 1.0 / s)
    return f.replace(**changes)


def _zeroed(f):
    extras = {k: np.zeros_like(v) if k in UNIT_FIELDS and v.dtype.kind == "f" else v for k, v in f.extras.items()}
    changes = {"extras": extras}
    if f.features is not None:
        changes["features"] = np.zeros_like(f.features)
    return f.replace(**changes)


def _with_dtype(f, dtype):
    """``f`` with every float array in ``dtype`` (the values of the float32 copy, so the
    float64 version holds exactly the same numbers)."""
    def cast(a):
        return a if a is None or a.dtype.kind != "f" else a.astype(np.float32).astype(dtype)

    return f.replace(logits=cast(f.logits), features=cast(f.features), head_weight=cast(f.head_weight),
                     head_bias=cast(f.head_bias), extras={k: cast(v) for k, v in f.extras.items()})


def _fresh_scores(det, x):
    if det.stateful:
        det.reset()
    return det.score(x)


def _refit(det, train):
    fresh = det.clone()
    return fresh.fit(train) if train is not None else fresh.fit()


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1e4, 1e30])
@pytest.mark.parametrize("name", ALL)
def test_feature_units_do_not_change_the_ranking(name, scale):
    """Scale-invariant detectors rank samples the same in any units (knn, ssd, nnguide,
    relation, fdbd and the CLIP detectors gave AUROC 0.5 at 1e30 / 1e-30 before); the others
    give varying finite scores or a ValueError."""
    det, train, x = fitted_example(name)
    base = _fresh_scores(det, x)
    if not _reads_units(det):  # logit-only, AbeT (logits + temperature), text
        np.testing.assert_array_equal(_fresh_scores(det, _rescaled(x, scale)), base)
        return
    try:
        scaled = _fresh_scores(_refit(det, _rescaled(train, scale)), _rescaled(x, scale))
    except ValueError as err:
        assert name in NOT_SCALE_INVARIANT, f"{name} at scale {scale:g} refused: {err}"
        return
    assert np.all(np.isfinite(scaled))
    assert np.ptp(scaled) > 0, f"{name} at scale {scale:g}: every sample got the same score"
    if name not in NOT_SCALE_INVARIANT:
        rho = _spearman(base, scaled)
        assert rho > 0.999, f"{name} at scale {scale:g}: rank correlation with scale 1 is {rho:.4f}"


def test_saturating_detector_refuses_extreme_units_instead_of_a_constant_score(problem):
    det = ood.create("odin", model=problem.model).fit()
    with pytest.raises(ValueError, match="same score"):
        det.score(_rescaled(problem.test_id[:30], 1e30))


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("lm_ratio",)])
def test_all_zero_features(name):
    """All-zero training features: a clear ValueError or finite scores; all-zero rows at
    score time: finite scores (gram ended in a FloatingPointError on both)."""
    det, train, x = fitted_example(name)
    if not _reads_units(det):
        pytest.skip(f"{name} reads no features")
    mixed = x[:10]
    zero_rows = _zeroed(mixed[:4])
    scores = _fresh_scores(det, Features.concat([zero_rows, mixed[4:]]))
    assert np.all(np.isfinite(scores)), f"{name}: non-finite scores on all-zero rows"
    if train is not None:
        try:
            refit = _refit(det, _zeroed(train))
        except ValueError as err:
            assert str(err), name
            return
        assert np.all(np.isfinite(_fresh_scores(refit, x))), f"{name}: non-finite after an all-zero fit"


def test_gram_all_zero_training_layer_is_a_clear_error(problem):
    with pytest.raises(ValueError, match="zero for every training sample"):
        ood.create("gram").fit(_zeroed(problem.train))


def test_gram_values_far_beyond_training_are_finite_or_refused(problem):
    det = ood.create("gram").fit(problem.train)
    far = _rescaled(problem.test_id[:20], 1e30).replace(head_weight=problem.test_id.head_weight)
    scores = det.score(far)  # Gram row sums grow as x^2: 1e60, finite in float64
    assert np.all(np.isfinite(scores)) and np.all(scores < det.score(problem.test_id[:20]).min())
    wide = problem.test_id[:5].replace(features=problem.test_id.features[:5].astype(np.float64))
    with pytest.raises(ValueError, match="overflow float64"):  # 1e200 needs float64 features
        det.score(_rescaled(wide, 1e200).replace(head_weight=problem.test_id.head_weight))


@pytest.mark.parametrize("name", ALL)
def test_float32_and_float64_copies_get_the_same_scores(name):
    """One working precision: the same numbers stored as float32 or float64 give the same
    scores (msp differed by 1.4% of its spread; entropy/GEN by more than their spread)."""
    det, train, x = fitted_example(name)
    s32 = _fresh_scores(_refit(det, None if train is None else _with_dtype(train, np.float32)),
                        _with_dtype(x, np.float32))
    s64 = _fresh_scores(_refit(det, None if train is None else _with_dtype(train, np.float64)),
                        _with_dtype(x, np.float64))
    spread = max(float(np.ptp(s64)), 1e-300)
    assert np.max(np.abs(s32 - s64)) <= 1e-6 * spread, name


LOGIT_FAMILIES = ("logits", "shaping")


@pytest.mark.parametrize("logit_scale", [1e-4, 1e-2, 1.0, 10.0])
@pytest.mark.parametrize("name", [n for n in ALL if get_detector_class(n).__module__.rsplit(".", 1)[-1]
                                  in LOGIT_FAMILIES and get_detector_class(n).requires <= {"logits"}])
def test_float64_logits_and_their_float32_rounding_agree(name, logit_scale):
    """Scores of float64 logits and of their float32 rounding differ only by that rounding
    (at logit scale 1e-4 float32 arithmetic made entropy/GEN scores rounding noise)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, logit_scale, (400, 10))
    # 30% of labels wrong: with every label = argmax, tempscale's fitted T runs to its lower
    # bound and magnifies the rounding it is supposed to be compared against
    labels = np.where(rng.random(400) < 0.7, logits.argmax(1), rng.integers(0, 10, 400))
    train = Features(logits=logits, labels=labels)
    det = ood.create(name)
    det = det.fit(train) if det.fit_requirements() else det.fit()
    s64 = det.score(Features(logits=logits))
    s32 = det.score(Features(logits=logits.astype(np.float32)))
    assert np.max(np.abs(s64 - s32)) <= 1e-5 * np.ptp(s64), name


@pytest.mark.parametrize("name", ALL)
def test_a_batch_scores_as_its_rows_one_by_one(name):
    """Stateless detectors score every sample on its own; a stateful one states how a batch
    relates to its rows (STREAM_SEMANTICS, its ``stream_note``) and is checked on that."""
    det, _, x = fitted_example(name)
    x = x[:12]
    if det.stateful:
        assert name in STREAM_SEMANTICS and type(det).stream_note, (
            f"{name} is stateful: say how a batch relates to its rows (stream_note) and test it here")
        _check_stream(name, det, x)
        return
    batch = det.score(x)
    rows = np.concatenate([det.score(x[i]) for i in range(len(x))])
    # float32 GEMMs (faiss) round a one-row query differently from a batch: ~1e-7 relative,
    # which z-score fusion (ensemble) scales by 1/std of the member scores
    np.testing.assert_allclose(rows, batch, rtol=1e-5, atol=1e-5 * max(float(np.ptp(batch)), 1e-12))


def _check_stream(name, det, x):
    assert name == "adaneg"
    block = 5
    det = det.clone(stream_batch_size=block).fit()
    batch = det.score(x)
    det.reset()
    blocks = np.concatenate([det.score(x[i:i + block]) for i in range(0, len(x), block)])
    np.testing.assert_array_equal(blocks, batch)
    det.reset()
    rows = np.concatenate([det.score(x[i]) for i in range(len(x))])
    assert not np.allclose(rows, batch), "with blocks of 5, rows one by one differ (memory written first)"
    one_by_one = det.clone(stream_batch_size=1).fit()
    np.testing.assert_array_equal(one_by_one.score(x), rows)


def test_oodscope_list_says_which_detectors_score_a_stream(capsys):
    import argparse

    from oodscope import listing

    listing.run(argparse.Namespace(family=None, wide=False, csv=None))
    out = capsys.readouterr().out
    assert "adaneg is stateful: " + get_detector_class("adaneg").stream_note in out
    assert "Every other detector scores each sample on its own" in out
