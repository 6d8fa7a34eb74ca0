"""Activation-shaping detectors: hand-checked values, equivalences, invariances, properties.

Expected values are computed independently with plain Python lists and `math`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import oodscope as ood
from oodscope import Features
from oodscope.detectors import shaping

W = [[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -0.5]]
B = [0.5, -0.5]
H = [1.0, 2.0, 3.0, 4.0]


def _energy_by_hand(h, w=W, b=B):
    logits = [sum(wi * hi for wi, hi in zip(row, h)) + bi for row, bi in zip(w, b)]
    return math.log(sum(math.exp(z) for z in logits))


def _feats(rows, w=W, b=B):
    return Features(
        features=np.asarray(rows, dtype=np.float32),
        head_weight=np.asarray(w, dtype=np.float32),
        head_bias=np.asarray(b, dtype=np.float32),
    )


def _score(name, x, train=None, **params):
    return ood.create(name, **params).fit(train).score(x)


# ----------------------------------------------------------------------------- hand-checked
def test_ash_variants_and_scale_by_hand():
    x = _feats([H])
    s1, s2 = 10.0, 7.0  # p=50 keeps the two largest activations, 3 and 4
    cases = {
        "ash_p": [0, 0, 3, 4],
        "ash_b": [0, 0, 5, 5],  # each kept unit gets s1/k = 10/2
        "ash_s": [0, 0, 3 * math.exp(s1 / s2), 4 * math.exp(s1 / s2)],
        "scale": [v * math.exp(s1 / s2) for v in H],
    }
    for name, shaped in cases.items():
        assert _score(name, x, percentile=50)[0] == pytest.approx(
            _energy_by_hand(shaped), rel=1e-6
        ), name


def test_react_by_hand():
    train = _feats([[0, 1, 2, 3], [4, 5, 6, 7]])
    det = ood.create("react", percentile=50).fit(train)
    assert det.threshold_ == pytest.approx(3.5)  # median of 0..7
    got = det.score(_feats([H, [0.5, 9.0, 0.0, 3.6]]))
    np.testing.assert_allclose(
        got, [_energy_by_hand([1, 2, 3, 3.5]), _energy_by_hand([0.5, 3.5, 0, 3.5])], rtol=1e-6
    )


def test_dice_by_hand():
    train = _feats([[1, 1, 2, 4], [3, 1, 0, 0]])  # mean feature (2, 1, 1, 2)
    # contributions W * mean: [[2, 0, -1, 1], [0, 2, 0, -1]]; sparsity 75 keeps the 2 largest (2 and 2)
    masked = [[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]
    det = ood.create("dice", sparsity=75).fit(train)
    np.testing.assert_array_equal(det.mask_, np.asarray(masked) != 0)
    assert det.score(_feats([H]))[0] == pytest.approx(_energy_by_hand(H, w=masked), rel=1e-6)


def test_vra_by_hand():
    # unit j of the 5 training rows takes the values 0..4 scaled by (j + 1)
    train = _feats([[i * (j + 1) for j in range(4)] for i in range(5)])
    det = ood.create("vra", alpha=25, beta=75).fit(
        train
    )  # per unit: alpha_j = 1(j+1), beta_j = 3(j+1)
    np.testing.assert_allclose(det.low_, [1, 2, 3, 4])
    np.testing.assert_allclose(det.high_, [3, 6, 9, 12])
    h = [0.5, 7.0, 5.0, 3.9]
    shaped = [0.0, 6.0, 5.0, 0.0]  # below alpha -> 0, above beta -> beta, otherwise kept
    assert det.score(_feats([h]))[0] == pytest.approx(_energy_by_hand(shaped), rel=1e-6)


# ----------------------------------------------------------------------------- AbeT
ABET_LOGITS = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]])


def test_abet_by_hand_and_ablation():
    t = np.array([0.5, 1.0, 0.25])
    expected = [
        math.log(sum(math.exp(v / ti) for v in r)) for r, ti in zip(ABET_LOGITS.tolist(), t)
    ]
    det = ood.create("abet").fit()
    for temp in (t, t[:, None]):
        got = det.score(Features(logits=ABET_LOGITS, extras={"temperature": temp}))
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The leading T(x) of the ordinary energy is ablated: the two differ when T != 1.
    assert not np.allclose(expected, t * np.array(expected))


def test_abet_with_unit_temperature_is_energy():
    rng = np.random.default_rng(0)
    f = np.tanh(rng.standard_normal((50, 7)))  # cosine-like logits in (-1, 1)
    abet = ood.create("abet").fit().score(Features(logits=f, extras={"temperature": np.ones(50)}))
    np.testing.assert_allclose(
        abet, ood.create("energy").fit().score(Features(logits=f)), rtol=1e-6
    )


def test_abet_sign_on_cosine_logits(problem):
    """Cosine logits of the synthetic problem: ID (aligned with a class) beats far OOD."""

    def cosine_features(f: Features, temperature: float) -> Features:
        h = f.features / np.maximum(np.linalg.norm(f.features, axis=1, keepdims=True), 1e-12)
        w = f.head_weight / np.linalg.norm(f.head_weight, axis=1, keepdims=True)
        return Features(logits=h @ w.T, extras={"temperature": np.full(len(f), temperature)})

    det = ood.create("abet").fit()
    for temp in (0.1, 1.0):
        s_id = det.score(cosine_features(problem.test_id, temp))
        s_ood = det.score(cosine_features(problem.test_ood, temp))
        assert ood.metrics.auroc(s_id, s_ood) >= 0.95


def test_abet_rejects_bad_temperature():
    det = ood.create("abet").fit()
    with pytest.raises(ValueError, match="temperature"):
        det.score(Features(logits=ABET_LOGITS))  # missing extra
    with pytest.raises(ValueError, match="> 0"):
        det.score(Features(logits=ABET_LOGITS, extras={"temperature": np.array([0.5, 0.0, 1.0])}))
    with pytest.raises(ValueError, match="shape"):
        det.score(Features(logits=ABET_LOGITS, extras={"temperature": np.ones((3, 2))}))
    with pytest.raises(ValueError, match="NaN or inf"):
        det.score(
            Features(logits=ABET_LOGITS, extras={"temperature": np.array([0.5, np.nan, 1.0])})
        )


# ----------------------------------------------------------------------------- equivalences
def _head_energy(f: Features) -> np.ndarray:
    return ood.create("energy").fit().score(Features(logits=f.logits_from_features()))


def test_react_at_100th_percentile_is_energy_on_training_data(problem):
    det = ood.create("react", percentile=100).fit(problem.train)
    np.testing.assert_allclose(det.score(problem.train), _head_energy(problem.train), rtol=1e-5)
    # the cached logits came from the same head
    np.testing.assert_allclose(
        det.score(problem.train), ood.create("energy").fit().score(problem.train), rtol=1e-5
    )


@pytest.mark.parametrize(
    "name,params",
    [("ash_p", {"percentile": 0}), ("dice", {"sparsity": 0}), ("vra", {"alpha": 0, "beta": 100})],
)
def test_no_shaping_limits_are_energy(name, params, problem):
    got = _score(name, problem.train, problem.train, **params)
    np.testing.assert_allclose(got, _head_energy(problem.train), rtol=1e-5)


def test_ash_s_and_scale_without_pruning_scale_by_e(problem):
    f = problem.test_id
    by_e = (
        ood.create("energy")
        .fit()
        .score(Features(logits=math.e * (f.features @ f.head_weight.T) + f.head_bias))
    )
    for name in ("ash_s", "scale"):
        np.testing.assert_allclose(_score(name, f, percentile=0), by_e, rtol=1e-5)


def test_scale_equals_ash_s_when_pruned_units_are_zero():
    rng = np.random.default_rng(0)
    h = np.abs(rng.standard_normal((30, 20))) + 0.1
    h[:, :12] = 0.0  # 60% zeros per row: pruning at p=50 removes only zeros
    w = rng.standard_normal((3, 20))
    x = _feats(h, w=w, b=[0.1, 0.0, -0.1])
    np.testing.assert_allclose(
        _score("scale", x, percentile=50), _score("ash_s", x, percentile=50), rtol=1e-6
    )
    assert not np.allclose(_score("scale", x, percentile=80), _score("ash_s", x, percentile=80))


@pytest.mark.parametrize("name", ["ash_p", "ash_b", "ash_s", "scale", "react", "dice", "vra"])
@pytest.mark.parametrize("factor", [1e-3, 7.0])
def test_invariant_to_feature_units(name, factor, problem):
    """Rescaling features by c and the head by 1/c changes no logit, so no score."""

    def rescale(f):
        return f.replace(
            features=(f.features * factor).astype(np.float32),
            head_weight=(f.head_weight / factor).astype(np.float32),
        )

    base = _score(name, problem.test_id, problem.train)
    scaled = _score(name, rescale(problem.test_id), rescale(problem.train))
    np.testing.assert_allclose(scaled, base, rtol=2e-4)


@pytest.mark.parametrize("name", ["ash_b", "ash_s", "react", "dice", "vra", "scale"])
def test_blockwise_scoring_matches_whole(name, problem, monkeypatch):
    whole = _score(name, problem.test_id, problem.train)
    monkeypatch.setattr(shaping, "_BLOCK_ELEMENTS", 7 * problem.dim)  # blocks of 7 rows
    np.testing.assert_allclose(_score(name, problem.test_id, problem.train), whole, rtol=1e-6)


def test_large_banks_use_a_seeded_subset_for_percentiles(problem, monkeypatch):
    exact = ood.create("react").fit(problem.train).threshold_
    monkeypatch.setattr(shaping, "_MAX_PERCENTILE_ELEMENTS", 200 * problem.dim)
    a = ood.create("react").fit(problem.train).threshold_
    b = ood.create("react").fit(problem.train).threshold_
    assert a == b and a == pytest.approx(exact, rel=0.1)


def test_dice_rejects_another_head(problem):
    det = ood.create("dice").fit(problem.train)
    other = problem.test_id.replace(head_weight=problem.test_id.head_weight * 2)
    with pytest.raises(ValueError, match="different classifier head"):
        det.score(other)


def test_shaping_detectors_improve_on_energy_when_ood_has_spikes():
    """A far-OOD pattern ReAct was designed for: OOD samples with a few huge activations."""
    rng = np.random.default_rng(0)
    d, c = 32, 4
    w = rng.standard_normal((c, d)).astype(np.float32)
    id_feats = np.abs(rng.normal(1.0, 0.3, (400, d)))
    ood_feats = np.abs(rng.normal(0.3, 0.1, (400, d)))
    ood_feats[np.arange(400), rng.integers(0, d, 400)] = 25.0  # one saturated unit each
    train, x_id, x_ood = (
        _feats(a, w=w, b=np.zeros(c)) for a in (id_feats[:200], id_feats[200:], ood_feats)
    )
    auroc = {}
    for name in ("react", "energy"):
        det = ood.create(name).fit(train)
        if name == "energy":
            s_id = det.score(Features(logits=x_id.logits_from_features()))
            s_ood = det.score(Features(logits=x_ood.logits_from_features()))
        else:
            s_id, s_ood = det.score(x_id), det.score(x_ood)
        auroc[name] = ood.metrics.auroc(s_id, s_ood)
    assert auroc["react"] > 0.95 and auroc["react"] > auroc["energy"] + 0.1, auroc


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "name,params",
    [
        ("react", {"percentile": 101}),
        ("react", {"percentile": -1}),
        ("react", {"percentile": True}),
        ("ash_p", {"percentile": 100}),
        ("ash_b", {"percentile": "90"}),
        ("ash_s", {"percentile": float("nan")}),
        ("scale", {"percentile": 100}),
        ("dice", {"sparsity": 100}),
        ("vra", {"alpha": 90, "beta": 60}),
        ("vra", {"alpha": 50, "beta": 120}),
    ],
)
def test_bad_params_raise(name, params, problem):
    with pytest.raises(ValueError, match="alpha|percentile|sparsity"):
        ood.create(name, **params).fit(problem.train)


# ----------------------------------------------------------------------------- properties
# With a single class whose weights are all 1 and no bias, the energy is the plain sum of
# the shaped activations, which makes each method's definition directly checkable.
nonneg_rows = arrays(
    np.float32,
    st.tuples(st.integers(1, 5), st.integers(2, 24)),
    elements=st.floats(0, 10, width=32),
)


def _sum_head(h):
    return _feats(h, w=np.ones((1, h.shape[1])), b=[0.0])


@settings(max_examples=40, deadline=None)
@given(h=nonneg_rows, p=st.sampled_from([0, 10, 50, 65, 90, 99]))
def test_ash_definitions_on_a_summing_head(h, p):
    x = _sum_head(h)
    n = h.shape[1]
    k = max(1, n - int(np.round(n * p / 100)))
    hd = h.astype(np.float64)
    s1 = hd.sum(axis=1)
    s2 = np.sort(hd, axis=1)[:, ::-1][:, :k].sum(axis=1)  # sum of the k largest
    ratio = np.where(s2 > 0, s1 / np.where(s2 > 0, s2, 1), 0.0)
    np.testing.assert_allclose(_score("ash_p", x, percentile=p), s2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        _score("ash_b", x, percentile=p), s1, rtol=1e-5, atol=1e-4
    )  # sum preserved
    np.testing.assert_allclose(
        _score("ash_s", x, percentile=p), s2 * np.exp(ratio), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        _score("scale", x, percentile=p), s1 * np.exp(ratio), rtol=1e-5, atol=1e-4
    )


@settings(max_examples=40, deadline=None)
@given(train=nonneg_rows.filter(lambda a: len(a) >= 2), p=st.floats(0, 100))
def test_react_clips_at_the_training_percentile(train, p):
    det = ood.create("react", percentile=p).fit(_sum_head(train))
    c = np.percentile(train.astype(np.float64), p)
    assert det.threshold_ == pytest.approx(c, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(
        det.score(_sum_head(train)),
        np.minimum(train, det.threshold_).sum(axis=1),
        rtol=1e-5,
        atol=1e-4,
    )
