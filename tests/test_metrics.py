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


# --------------------------------------------------------------------------- one curve, one bootstrap
def _reference(a, b):
    """The metric definitions computed independently, the slow direct way."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[a, b])
    out = {"auroc": (ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0) / (a.size * b.size)}
    s = np.sort(a)[::-1]
    t = s[max(int(np.ceil(0.95 * a.size - 1e-12)), 1) - 1]
    out["fpr_at_95_tpr"] = np.mean(b >= t)
    _, out["aupr_in"], out["aupr_out"] = _sk(a, b)
    thresholds = np.r_[np.unique(np.r_[a, b]), np.inf]
    tpr = np.array([np.mean(a >= x) for x in thresholds])
    fpr = np.array([np.mean(b >= x) for x in thresholds])
    out["detection_error"] = np.min(0.5 * (1 - tpr) + 0.5 * fpr)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_evaluate_matches_direct_definitions_on_tied_data(seed):
    rng = np.random.default_rng(seed)
    na, nb = rng.integers(1, 300, 2)
    a = rng.integers(0, 12, na).astype(float)
    b = rng.integers(-3, 9, nb).astype(float)
    if seed == 0:
        a[:] = 4.0  # one tie group on the ID side
    got, ref = M.evaluate(a, b), _reference(a, b)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
        assert M.METRICS[k](a, b) == pytest.approx(v, abs=1e-9), k


def test_fpr_at_other_tpr_matches_threshold_rule():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 30, 401).astype(float), rng.integers(0, 30, 133).astype(float)
    for tpr in (0.01, 0.3, 0.5, 0.8, 0.95, 0.99, 1.0):
        assert M.fpr_at_tpr(a, b, tpr) == np.mean(b >= M.threshold_at_tpr(a, tpr))


def test_bootstrap_replicates_are_resampled_metric_calls():
    """The weighted O(n) replicate equals resampling the arrays and calling the metrics."""
    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(1, 1, 150), 1), np.round(rng.normal(0, 1, 90), 1)
    names = tuple(M.METRICS)
    reps = M.bootstrap_replicates(a, [b], 25, seed=7, metrics=names)
    draw = np.random.default_rng(7)
    for i in range(25):
        ra = a[draw.integers(0, a.size, a.size)]
        rb = b[draw.integers(0, b.size, b.size)]
        for m in names:
            assert reps[m][i, 0] == pytest.approx(M.METRICS[m](ra, rb), abs=1e-12), m


def test_bootstrap_shares_the_id_resample_across_ood_sets():
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(1, 1, 200), rng.normal(0, 1, 100), rng.normal(-1, 1, 60)
    joint = M.bootstrap_replicates(a, [b, c], 30, seed=2)
    draw = np.random.default_rng(2)
    for i in range(30):
        ra = a[draw.integers(0, a.size, a.size)]
        for j, o in enumerate((b, c)):
            ro = o[draw.integers(0, o.size, o.size)]
            assert joint["auroc"][i, j] == pytest.approx(M.auroc(ra, ro), abs=1e-12)
    per_set = M.bootstrap_replicates([a, a], [b, c], 30, seed=2)
    for m in M.CI_METRICS:
        np.testing.assert_array_equal(per_set[m], joint[m])
    with pytest.raises(ValueError, match="same ID samples"):
        M.bootstrap_replicates([a, a[:-1]], [b, c], 3, seed=0)
    with pytest.raises(ValueError, match="one per set"):
        M.bootstrap_replicates([a], [b, c], 3, seed=0)


def test_ci_and_bootstrap_ci_come_from_bootstrap_replicates():
    rng = np.random.default_rng(4)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    r = M.evaluate(a, b, ci=True, n_boot=50, alpha=0.1, seed=5)
    reps = M.bootstrap_replicates(a, [b], 50, seed=5)
    for m in M.CI_METRICS:
        lo, hi = np.quantile(reps[m][:, 0], [0.05, 0.95])
        assert (r[f"{m}_lo"], r[f"{m}_hi"]) == (lo, hi)
        assert M.bootstrap_ci(a, b, m, n_boot=50, alpha=0.1, seed=5) == (lo, hi)
    lo, hi = M.bootstrap_ci(a, b, "detection_error", n_boot=50, seed=5)
    assert lo <= M.detection_error(a, b) <= hi


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("bad", [["a", "b"], "0.5", np.array(["1.0", "2.0"]), [1.0, None], [[1.0], [1.0, 2.0]],
                                 np.array([1 + 2j])])
def test_non_numeric_scores_name_the_argument(bad):
    with pytest.raises(ValueError, match="ood_scores"):
        M.evaluate([1.0, 2.0], bad)
    with pytest.raises(ValueError, match="id_scores"):
        M.auroc(bad, [1.0, 2.0])


def test_bool_and_int_scores_are_numbers():
    assert M.auroc([True, True], [False, False]) == 1.0
    assert M.auroc(np.array([3, 4], dtype=np.int8), [1, 2]) == 1.0


@pytest.mark.parametrize("n_boot", [0, -3, 2.5, True, "100"])
def test_n_boot_must_be_positive_integer_for_intervals(n_boot):
    a, b = np.arange(10.0), np.arange(5.0)
    with pytest.raises(ValueError, match="n_boot"):
        M.evaluate(a, b, ci=True, n_boot=n_boot)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(a, b, n_boot=n_boot)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_replicates(a, [b], n_boot, seed=0)
    assert "auroc_lo" not in M.evaluate(a, b, ci=False, n_boot=n_boot)  # unused without ci


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.05"])
def test_alpha_outside_unit_interval_rejected(alpha):
    a, b = np.arange(10.0), np.arange(5.0)
    with pytest.raises(ValueError, match="alpha"):
        M.evaluate(a, b, ci=True, n_boot=5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci(a, b, n_boot=5, alpha=alpha)


def test_bootstrap_ci_takes_metric_names():
    with pytest.raises(ValueError, match="metric must be one of"):
        M.bootstrap_ci([1.0, 2.0], [0.0], metric="accuracy")
    with pytest.raises(ValueError, match="metric must be one of"):
        M.bootstrap_ci([1.0, 2.0], [0.0], metric=M.auroc)
    with pytest.raises(ValueError, match="Unknown metric"):
        M.bootstrap_replicates([1.0, 2.0], [[0.0]], 3, seed=0, metrics=("auroc", "f1"))


def test_evaluate_large_input_is_one_sort_fast():
    """10^5 + 10^5 scores: evaluate costs about one sort (a generous bound for loaded CI)."""
    import time

    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 10**5), rng.normal(0, 1, 10**5)
    start = time.perf_counter()
    M.evaluate(a, b)
    assert time.perf_counter() - start < 1.0
