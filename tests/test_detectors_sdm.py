"""SDM (Similarity-Distance-Magnitude): the activation, q and d on hand-made cases, the
rescaler gradient, the threshold search, the admit decision and bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import oodscope as ood
from oodscope import Features
from oodscope.detectors.sdm import SDM, sdm_activation, similarity_distance


def test_activation_is_softmax_at_q_e_minus_2_and_uniform_at_d0():
    z = np.array([[1.0, 2.0, -0.5], [10.0, 0.0, 0.0]])
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(sdm_activation(z, np.full(2, np.e - 2)), soft, rtol=1e-12)
    np.testing.assert_allclose(sdm_activation(z, np.full(2, 5.0), np.zeros(2)), 1 / 3)
    # hand value: base 2+q = 4, exponent d*z with d = 0.5 -> 4^(0.5 z) = 2^z
    p = sdm_activation(np.array([[1.0, 0.0]]), np.array([2.0]), np.array([0.5]))
    np.testing.assert_allclose(p, [[2 / 3, 1 / 3]])


def test_activation_is_finite_for_huge_logits_and_sharpens_with_q():
    z = np.array([[1e6, 0.0], [1.0, 0.0], [1.0, 0.0]])
    p = sdm_activation(z, np.array([1000.0, 0.0, 100.0]))
    assert np.all(np.isfinite(p)) and p[0, 0] == 1.0
    assert p[2, 0] > p[1, 0]  # more similar training support, sharper output


def test_q_counts_consecutive_matching_neighbours():
    # support on a line at 1, 2, 3, 4, 5; predicted class 0 except the point at 4, which is
    # predicted 1; the point at 2 is predicted 0 but wrongly (its label is 1)
    support = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    pred = np.array([0, 0, 0, 1, 0])
    good = np.array([True, False, True, True, True])
    q, d0 = similarity_distance(np.array([[0.9], [2.9], [3.4], [4.2], [0.9]]), np.array([0, 0, 0, 1, 1]),
                                support, good, pred, max_q=10)
    # x=0.9 (pred 0): 1 matches, 2 is wrong -> stop: q=1. x=2.9: nearest 3 ok, then 2 (wrong): 1.
    # x=3.4 (pred 0): 3 ok, 4 is class 1 -> 1. x=4.2 (pred 1): 4 ok, 5 is class 0 -> 1.
    # x=0.9 (pred 1): nearest is class 0 -> 0.
    np.testing.assert_array_equal(q, [1, 1, 1, 1, 0])
    np.testing.assert_allclose(d0, [0.1, 0.1, 0.4, 0.2, 0.1], atol=1e-12)
    q, _ = similarity_distance(np.array([[6.0]]), np.array([0]), support, np.ones(5, bool),
                               np.zeros(5, int), max_q=3)
    assert q[0] == 3  # all five match; capped at max_q


def test_q_agrees_with_brute_force_walk():
    rng = np.random.default_rng(0)
    support = rng.standard_normal((60, 3))
    spred = rng.integers(0, 3, 60)
    good = rng.random(60) < 0.8
    x = rng.standard_normal((25, 3))
    xpred = rng.integers(0, 3, 25)
    q, d0 = similarity_distance(x, xpred, support, good, spred, max_q=1000, chunk_size=7)
    for i in range(25):
        dist = np.linalg.norm(support - x[i], axis=1)
        walk = 0
        for j in np.argsort(dist):
            if not (good[j] and spred[j] == xpred[i]):
                break
            walk += 1
        assert q[i] == walk
        assert d0[i] == pytest.approx(dist.min())


def test_distance_quantile_and_dkw_by_hand():
    det = SDM()
    det.num_classes_ = 2
    det.d_cdf_, det.d_offsets_ = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 6.0]), np.array([0, 4, 6])
    # d0 = 2.5: class 0: 1 - 2/4 = 0.5; class 1: 1 - 1/2 = 0.5 -> 0.5; d0 = 0.5 -> 1; d0 = 7 -> 0
    d0, pred = np.array([2.5, 0.5, 7.0, 3.5]), np.array([0, 1, 0, 1])
    np.testing.assert_allclose(det._distance_quantile(d0, pred), [0.5, 1.0, 0.0, 0.25])
    # "predicted": class 0 for 2.5 -> 0.5; class 1 for 0.5 -> 1; class 0 for 7 -> 0; class 1 for 3.5 -> 0.5
    det.distance_mode = "predicted"
    np.testing.assert_allclose(det._distance_quantile(d0, pred), [0.5, 1.0, 0.0, 0.5])
    det.alpha = 0.95
    det.qbin_cdf_, det.qbin_offsets_ = np.array([0.5, 1.0, 1.5, 2.0, 1.0]), np.array([0, 4, 5])
    eps = det._dkw_errors(np.array([1.7]), 1)
    # class 0: three q-bins below 1.7 -> n = 3; class 1: one below but capped at size-1 = 0 -> 1
    np.testing.assert_allclose(eps, [[np.sqrt(np.log(2 / 0.05) / 6), 1.0]])


def test_rescaler_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    det = SDM(rescaler_iters=1)
    det.num_classes_ = 3
    v = rng.random((40, 3))
    soft = rng.random(40) * 2
    y = rng.integers(0, 3, 40)
    captured = {}

    import scipy.optimize

    real = scipy.optimize.minimize

    def spy(fun, x0, **kw):
        captured["fun"] = fun
        return real(fun, x0, **kw)

    scipy.optimize.minimize = spy
    try:
        det._train_rescaler(v, soft, y)
    finally:
        scipy.optimize.minimize = real
    w = rng.standard_normal(9)
    loss, grad = captured["fun"](w)
    num = np.array([(captured["fun"](w + h)[0] - captured["fun"](w - h)[0]) / 2e-6
                    for h in np.eye(9) * 1e-6])
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-8)
    # the loss by hand at W = 0 (ridge 1e-3 * ||I||^2 / 2 aside): uniform output, -log_b(1/3)
    b = 2 + soft
    assert captured["fun"](np.zeros(9))[0] == pytest.approx(np.mean(np.log(3) / np.log(b)) + 0.5e-3 * 3)


def test_threshold_search_picks_the_lowest_bin_where_every_class_reaches_alpha():
    det = SDM(alpha=0.75)  # 1 - alpha exact in binary: the quantile index int(0.25 n) is exact
    det.num_classes_ = 2
    # 20 points per class; low bins (soft < 2) carry a bad point per class
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    soft = np.tile(np.r_[1.0, 1.5, np.full(18, 3.0)], 2)
    p_true = np.tile(np.r_[0.2, 0.3, np.full(18, 0.97)], 2)

    def search(p_true, ood=None):
        det.calibration_p_true_, det.calibration_qbin_ = p_true, soft
        det.calibration_labels_ = y
        det.calibration_ood_ = np.zeros(40, bool) if ood is None else ood
        return det._thresholds(0.75)

    thr, b, found = search(p_true)
    # bin 1.0: the 25% quantile of [0.2, 0.3, 0.97 x18] is index 5 -> 0.97 >= 0.75 already
    assert found and b == 1.0 and np.all(thr == 0.97)
    p_true[[2, 3, 4, 5, 22, 23, 24, 25]] = 0.5  # four more bad points per class, at soft = 3.0
    thr, b, found = search(p_true)
    # bin 1.0: index 5 of 20 -> 0.5; bin 1.5: index 4 of 19 -> 0.5; bin 3.0: index 4 of
    # [0.5 x4, 0.97 x14] -> 0.97: the lowest bin that works is 3.0
    assert found and b == 3.0 and np.all(thr == 0.97)
    thr, b, found = search(np.full(40, 0.5))
    assert not found and b == np.inf and np.all(thr == 0)
    # OOD-flagged calibration points are left out of the search
    thr, b, found = search(p_true, soft < 3.0)
    assert found and b == 3.0


def test_alpha_candidates_share_one_fit_and_match_fresh_fits():
    """alpha is a score-time parameter: a fitted SDM with alpha changed scores, thresholds
    and admits exactly as one fitted with that alpha."""
    train, test = _noisy_problem(seed=3, n=900)[:2]
    shared = SDM(alpha=0.95).fit(train)
    shared.plan_score_params({"alpha": [0.99, 0.95, 0.9]})
    for alpha in (0.99, 0.95, 0.9):
        view = copy.copy(shared)
        view.alpha = alpha
        fresh = SDM(alpha=alpha).fit(train)
        assert np.array_equal(view.score(test), fresh.score(test))
        assert np.array_equal(view.thresholds_, fresh.thresholds_)
        assert view.min_qbin_ == fresh.min_qbin_
        assert np.array_equal(view.predict(test).admitted, fresh.predict(test).admitted)
    # different alphas widen differently, so the shared state really changed per copy
    low, high = copy.copy(shared), copy.copy(shared)
    low.alpha, high.alpha = 0.9, 0.99
    assert not np.array_equal(low.score(test), high.score(test))


def _noisy_problem(seed=0, n=1500, c=4, d=8, overlap=1.8):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((c, d)) * 2.0

    def make(m, ood=False):
        if ood:
            x = rng.standard_normal((m, d)) * 0.5 + 8.0
            y = -np.ones(m, int)
        else:
            y = rng.integers(0, c, m)
            x = means[y] + overlap * rng.standard_normal((m, d))
        logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
        return Features(logits=logits, features=x, labels=y)

    return make(n), make(600), make(600, ood=True)


def test_admitted_points_are_more_accurate_and_far_ood_is_not_admitted():
    train, test, far = _noisy_problem()
    det = ood.create("sdm").fit(train)
    out = det.predict(test)
    correct = out.prediction == test.labels
    assert det.threshold_found_
    assert 0.05 < out.admitted.mean() < correct.mean()
    assert correct[out.admitted].mean() > correct.mean() + 0.05
    assert correct[out.admitted].mean() >= 0.9
    far_out = det.predict(far)
    assert not far_out.admitted.any() and far_out.is_ood.all()
    # sign: the score is higher in distribution
    assert ood.metrics.auroc(det.score(test), det.score(far)) > 0.95
    np.testing.assert_array_equal(out.confidence, det.score(test))
    lo = out.lower[np.arange(len(test)), out.prediction]
    hi = out.calibrated[np.arange(len(test)), out.prediction]
    assert np.all(lo <= hi + 1e-9)


def test_score_orders_right_answers_before_wrong_ones_better_than_chance():
    from oodscope import selective

    train, test, _ = _noisy_problem(seed=1)
    det = ood.create("sdm").fit(train)
    correct = selective.correct_predictions(test.logits, test.labels)
    assert selective.aurc(det.score(test), correct) < 1 - correct.mean()
    summary = det.selective_summary(test)
    assert summary["coverage"] > 0 and summary["admitted_accuracy"] > summary["accuracy"]


def test_persisted_state_round_trips(tmp_path):
    from oodscope.persistence import load_detector, save_detector

    train, test, _ = _noisy_problem(seed=2, n=400)
    det = ood.create("sdm").fit(train)
    save_detector(det, tmp_path / "sdm")
    back = load_detector(tmp_path / "sdm")
    np.testing.assert_array_equal(back.predict(test).admitted, det.predict(test).admitted)
    np.testing.assert_allclose(back.score(test), det.score(test))


@pytest.mark.parametrize("params, match", [
    ({"alpha": 1.0}, "alpha"), ({"alpha": 0.3}, "alpha"), ({"calibration_fraction": 1.0}, "calibration_fraction"),
    ({"calibration_fraction": 1}, "calibration_fraction"), ({"max_q": 0}, "max_q"),
    ({"rescaler_iters": 2.5}, "rescaler_iters"), ({"rescaler_ridge": -1.0}, "rescaler_ridge"),
    ({"distance_mode": "max"}, "distance_mode"),
])
def test_bad_hyperparameters_raise(params, match):
    train, _, _ = _noisy_problem(n=50)
    with pytest.raises(ValueError, match=match):
        SDM(**params).fit(train)


def test_one_class_logits_and_missing_labels_raise():
    train, _, _ = _noisy_problem(n=50, c=2)
    one = Features(logits=np.zeros((20, 1)), features=np.ones((20, 3)), labels=np.zeros(20, int))
    with pytest.raises(ValueError, match="2 classes"):
        SDM().fit(one)
    with pytest.raises(ValueError, match="labels"):
        SDM().fit(train.replace(labels=None))


def test_held_out_calibration_keeps_all_of_train_as_support():
    train, held, far = _noisy_problem(seed=3, n=800)
    cal, test = held[:300], held[300:]
    det = ood.create("sdm").fit(train, calibration=cal)
    assert len(det.support_features_) == len(train)
    np.testing.assert_array_equal(det.support_features_, train.features)
    assert det.d_offsets_[-1] <= len(cal)  # distance eCDFs come from the calibration points
    # far OOD sits at the floor with the ID points whose nearest neighbour disagrees (q = 0)
    s_id, s_far = det.score(test), det.score(far)
    assert np.ptp(s_far) == 0 and ood.metrics.auroc(s_id, s_far) > 0.85
    split = ood.create("sdm").fit(train)
    assert len(split.support_features_) == len(train) - round(0.5 * len(train))


@pytest.mark.parametrize("change, match", [
    (lambda f: f.replace(labels=-np.ones(len(f), int)), "in-distribution labels"),
    (lambda f: f.replace(labels=np.full(len(f), 9)), "in-distribution labels"),
    (lambda f: f.replace(features=f.features[:, :3]), "width"),
    (lambda f: f.replace(labels=None), "labels"),
    (lambda f: f.replace(logits=np.where(np.arange(len(f))[:, None] == 2, np.nan, f.logits)), "NaN"),
])
def test_bad_calibration_set_raises(change, match):
    train, cal, _ = _noisy_problem(n=200)
    with pytest.raises(ValueError, match=match):
        SDM().fit(train, calibration=change(cal))
