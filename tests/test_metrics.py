import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodscope import metrics as M


def _sk(a, b):
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    s = np.r_[a, b]
    return roc_auc_score(y, s), average_precision_score(y, s), average_precision_score(1 - y, -s)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 20, 300).astype(float)  # many ties
    b = rng.integers(-5, 15, 200).astype(float)
    auc, ap_in, ap_out = _sk(a, b)
    assert abs(M.auroc(a, b) - auc) < 1e-9
    assert abs(M.aupr_in(a, b) - ap_in) < 1e-9
    assert abs(M.aupr_out(a, b) - ap_out) < 1e-9


def test_matches_sklearn_continuous():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 1000), rng.normal(0, 1, 700)
    auc, ap_in, ap_out = _sk(a, b)
    assert abs(M.auroc(a, b) - auc) < 1e-9
    assert abs(M.aupr_in(a, b) - ap_in) < 1e-9
    assert abs(M.aupr_out(a, b) - ap_out) < 1e-9


def test_fpr95_hand_computed():
    # 20 ID scores 1..20; keeping 95% (19 of 20) puts the threshold at 2.
    a = np.arange(1, 21, dtype=float)
    b = np.array([0.5, 1.5, 2.0, 3.0, 25.0])  # accepted: 2.0 (tie counts as accepted), 3, 25
    assert M.fpr_at_95_tpr(a, b) == pytest.approx(3 / 5)
    assert M.threshold_at_tpr(a, 0.95) == 2.0
    # at TPR 0.5 the threshold is 11: only 25 passes
    assert M.fpr_at_tpr(a, b, 0.5) == pytest.approx(1 / 5)


def test_perfect_and_inverted():
    a, b = np.array([3.0, 4.0]), np.array([1.0, 2.0])
    assert M.auroc(a, b) == 1.0 and M.fpr_at_95_tpr(a, b) == 0.0
    assert M.auroc(b, a) == 0.0 and M.fpr_at_95_tpr(b, a) == 1.0
    assert M.detection_error(a, b) == 0.0


def test_constant_scores_defined():
    a, b = np.ones(10), np.ones(7)
    assert M.auroc(a, b) == 0.5
    assert M.fpr_at_95_tpr(a, b) == 1.0
    assert M.detection_error(a, b) == 0.5


def test_openood_fpr_is_a_different_quantity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 500), rng.normal(0, 2, 500)
    assert M.ood_rejected_at_95_ood_recall(a, b) != pytest.approx(M.fpr_at_95_tpr(a, b))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_raise(bad):
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([1.0, bad], [0.0])
    with pytest.raises(ValueError):
        M.evaluate([1.0], [bad])


def test_empty_raise():
    with pytest.raises(ValueError, match="at least one"):
        M.auroc([], [1.0])


def test_evaluate_with_ci_brackets_point_estimate():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 400), rng.normal(0, 1, 400)
    r = M.evaluate(a, b, ci=True, n_boot=100)
    for k in ("auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out"):
        assert r[f"{k}_lo"] <= r[k] <= r[f"{k}_hi"]
    assert 0.6 < r["auroc"] < 0.85


def test_accuracy():
    assert M.accuracy(np.array([[1, 0], [0, 1], [1, 0]]), [0, 1, 1]) == pytest.approx(2 / 3)
