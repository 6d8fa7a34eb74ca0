"""Logit-based detectors: hand-checked values, limits/equivalences and property tests.

Expected values are computed independently with plain Python `math` loops, not with the
helpers the detectors use.
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

LOGITS = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]])


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _score(name, logits, train=None, **params):
    det = ood.create(name, **params)
    det.fit(None if train is None else Features(logits=train))
    return det.score(Features(logits=np.asarray(logits)))


# ----------------------------------------------------------------------------- hand-checked
def test_msp_maxlogit_energy_by_hand():
    msp = [max(_softmax_row(r)) for r in LOGITS.tolist()]
    mls = [max(r) for r in LOGITS.tolist()]
    energy = [math.log(sum(math.exp(v) for v in r)) for r in LOGITS.tolist()]
    energy_t2 = [2 * math.log(sum(math.exp(v / 2) for v in r)) for r in LOGITS.tolist()]
    np.testing.assert_allclose(_score("msp", LOGITS), msp, rtol=1e-6)
    np.testing.assert_allclose(_score("maxlogit", LOGITS), mls, rtol=1e-6)
    np.testing.assert_allclose(_score("energy", LOGITS), energy, rtol=1e-6)
    np.testing.assert_allclose(_score("energy", LOGITS, temperature=2.0), energy_t2, rtol=1e-6)
    assert msp[1] == pytest.approx(1 / 3) and energy[1] == pytest.approx(math.log(3))


def test_entropy_by_hand():
    expected = [sum(p * math.log(p) for p in _softmax_row(r)) for r in LOGITS.tolist()]
    np.testing.assert_allclose(_score("entropy", LOGITS), expected, rtol=1e-6)
    assert _score("entropy", LOGITS)[1] == pytest.approx(-math.log(3))


def test_gen_by_hand():
    gamma, m = 0.5, 2
    expected = []
    for r in LOGITS.tolist():
        top = sorted(_softmax_row(r), reverse=True)[:m]
        expected.append(-sum((p * (1 - p)) ** gamma for p in top))
    np.testing.assert_allclose(_score("gen", LOGITS, gamma=gamma, top_m=m), expected, rtol=1e-6)


def test_klm_by_hand():
    train = np.array([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # predicted 0, 0, 1
    p0, p1, p2 = (_softmax_row(r) for r in train.tolist())
    templates = [[(a + b) / 2 for a, b in zip(p0, p1)], p2]  # class 2 never predicted
    expected = []
    for r in LOGITS.tolist():
        p = _softmax_row(r)
        kls = [sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) for q in templates]
        expected.append(-min(kls))
    det = ood.create("klm").fit(Features(logits=train))
    np.testing.assert_array_equal(det.template_classes_, [0, 1])
    np.testing.assert_allclose(det.score(Features(logits=LOGITS)), expected, rtol=1e-6)
    # a sample whose softmax is exactly a template has KL 0: the highest possible score
    assert det.score(Features(logits=train[2:3]))[0] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- tempscale
def _calibrated_sample(t_true, n=20000, c=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((n, c))
    p = np.exp(logits / t_true)
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)  # y ~ softmax(f / T)
    return Features(logits=logits, labels=labels)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_tempscale_recovers_known_temperature(t_true):
    train = _calibrated_sample(t_true)
    det = ood.create("tempscale").fit(train)
    assert det.temperature_ == pytest.approx(t_true, rel=0.05)
    # score is MSP at the fitted temperature
    x = train[:20]
    np.testing.assert_allclose(
        det.score(x), _score("msp", x.logits, temperature=det.temperature_), rtol=1e-9
    )


def test_tempscale_respects_bounds():
    train = _calibrated_sample(8.0, n=4000)
    det = ood.create("tempscale", t_min=0.1, t_max=2.0).fit(train)
    assert 0.1 <= det.temperature_ <= 2.0 and det.temperature_ == pytest.approx(2.0, rel=1e-3)


# ----------------------------------------------------------------------------- equivalences
def test_energy_is_logsumexp_and_bounds_maxlogit():
    from scipy.special import logsumexp

    rng = np.random.default_rng(1)
    z = 10 * rng.standard_normal((200, 9))
    e = _score("energy", z)
    np.testing.assert_allclose(e, logsumexp(z, axis=1), rtol=1e-12)


def test_gen_gamma_one_all_classes_is_gini():
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        _score("gen", LOGITS, gamma=1.0, top_m=100), (p**2).sum(axis=1) - 1, rtol=1e-6
    )


def test_gen_is_accurate_for_confident_predictions():
    """1 − p_max must come from the other probabilities, not from 1 − 0.99999999999."""
    z = np.array([[11.0, -17.0], [16.0, -12.0], [40.0, 0.0]])
    gamma = 0.1
    p_small = [math.exp(-28.0) / (1 + math.exp(-28.0))] * 2 + [
        math.exp(-40.0) / (1 + math.exp(-40.0))
    ]
    # two classes: both terms equal (p(1 − p))^γ with p the small probability
    expected = [-2 * (p * (1 - p)) ** gamma for p in p_small]
    np.testing.assert_allclose(_score("gen", z, gamma=gamma, top_m=2), expected, rtol=1e-9)


def test_gen_small_gamma_limit():
    """(G_γ − M)/γ → Σ log(p_j(1 − p_j)) as γ → 0."""
    gamma, m = 1e-6, 2
    expected = []
    for r in LOGITS.tolist():
        top = sorted(_softmax_row(r), reverse=True)[:m]
        expected.append(sum(math.log(p * (1 - p)) for p in top))
    g = -_score("gen", LOGITS, gamma=gamma, top_m=m)
    np.testing.assert_allclose((g - m) / gamma, expected, rtol=1e-4)


def test_gen_top1_ranks_like_msp_when_confident():
    """With M = 1, G = (p_max(1 − p_max))^γ decreases in p_max once p_max > 1/2."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((300, 4)) * 4
    z[:, 0] += 15  # make every p_max > 1/2
    msp = _score("msp", z)
    assert msp.min() > 0.5
    gen = _score("gen", z, gamma=0.3, top_m=1)
    np.testing.assert_array_equal(np.argsort(gen, kind="stable"), np.argsort(msp, kind="stable"))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "name,params",
    [
        ("msp", {"temperature": 0}),
        ("energy", {"temperature": -1.0}),
        ("energy", {"temperature": float("nan")}),
        ("energy", {"temperature": "1"}),
        ("gen", {"gamma": 0}),
        ("gen", {"top_m": 0}),
        ("gen", {"top_m": 2.5}),
        ("tempscale", {"t_min": 2.0, "t_max": 1.0}),
        ("tempscale", {"t_min": 0.0}),
    ],
)
def test_bad_params_raise(name, params):
    det = ood.create(name, **params)
    train = _calibrated_sample(1.0, n=50)
    with pytest.raises(ValueError, match=next(iter(params))):
        det.fit(train)


# ----------------------------------------------------------------------------- properties
logit_matrices = st.integers(2, 8).flatmap(
    lambda c: arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.just(c)),
        elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False),
    )
)


@settings(max_examples=40, deadline=None)
@given(z=logit_matrices, shift=st.floats(-50, 50))
def test_shift_invariance_and_equivariance(z, shift):
    shifted = z + shift
    for name, params in [("msp", {}), ("entropy", {}), ("gen", {"gamma": 0.1, "top_m": 3})]:
        np.testing.assert_allclose(
            _score(name, shifted, **params), _score(name, z, **params), atol=1e-5
        )
    np.testing.assert_allclose(_score("energy", shifted), _score("energy", z) + shift, atol=1e-4)
    np.testing.assert_allclose(
        _score("maxlogit", shifted), _score("maxlogit", z) + shift, atol=1e-4
    )


@settings(max_examples=40, deadline=None)
@given(z=logit_matrices)
def test_score_ranges(z):
    c = z.shape[1]
    energy, mls = _score("energy", z), _score("maxlogit", z)
    assert np.all(energy >= mls - 1e-9) and np.all(energy <= mls + math.log(c) + 1e-9)
    msp = _score("msp", z)
    assert np.all(msp >= 1 / c - 1e-9) and np.all(msp <= 1 + 1e-12)
    ent = _score("entropy", z)
    assert np.all(ent <= 1e-12) and np.all(ent >= -math.log(c) - 1e-9)
    gen = _score("gen", z, gamma=0.1, top_m=3)
    assert np.all(gen <= 0) and np.all(gen >= -min(3, c) * 0.25**0.1 - 1e-9)


@settings(max_examples=30, deadline=None)
@given(z=logit_matrices, seed=st.integers(0, 10))
def test_class_permutation_invariance(z, seed):
    perm = np.random.default_rng(seed).permutation(z.shape[1])
    for name in ("msp", "energy", "entropy", "maxlogit", "gen"):
        np.testing.assert_allclose(_score(name, z[:, perm]), _score(name, z), rtol=1e-6, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(z=logit_matrices.filter(lambda a: len(a) >= 2))
def test_klm_is_a_negative_divergence(z):
    det = ood.create("klm").fit(Features(logits=z))
    s = det.score(Features(logits=z))
    assert np.all(s <= 1e-9)
    # a training sample that is alone in its predicted class matches its template exactly
    pred = z.argmax(axis=1)
    counts = np.bincount(pred, minlength=z.shape[1])
    alone = counts[pred] == 1
    np.testing.assert_allclose(s[alone], 0.0, atol=1e-9)


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy", "entropy", "gen", "klm", "tempscale"])
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_float32_fast_path_matches_float64(name, num_classes):
    """Float32 logits take a faster path; it must agree with the float64 path."""
    import oodscope as ood
    from oodscope import Features

    rng = np.random.default_rng(num_classes)
    logits = rng.normal(0, 3, (400, num_classes))
    labels = logits.argmax(1)
    f64 = Features(logits=logits, labels=labels)
    f32 = Features(logits=logits.astype(np.float32), labels=labels)
    s64 = ood.create(name).fit(f64).score(f64)
    s32 = ood.create(name).fit(f32).score(f32)
    # float32 inputs are themselves rounded to ~6e-8 relative; allow for that and the exps
    np.testing.assert_allclose(s32, s64, rtol=2e-5, atol=2e-6)
