"""OOD metrics on (id_scores, ood_scores), with scores higher = more in-distribution.

In-distribution is the positive class throughout. Definitions:

* ``auroc``: area under the ROC curve; ties count one half (Mann-Whitney U).
* ``fpr_at_tpr(tpr)``: the fraction of OOD samples accepted by the threshold that keeps
  at least ``tpr`` of ID samples; a sample is accepted when ``score >= threshold``, and
  OOD samples tied with the threshold are accepted (so ties never flatter a detector).
  ``fpr_at_95_tpr`` is the classic FPR@95 of the ODIN / Energy / KNN / ViM papers.
* ``ood_rejected_at_95_ood_recall``: the OpenOOD v1.5 quantity (OOD positive); a different
  number with its own name.
* ``aupr_in`` / ``aupr_out``: average precision with ID / OOD as positive (equal to
  scikit-learn's ``average_precision_score``).
* ``detection_error``: ``min_t 0.5·(1 - TPR(t)) + 0.5·FPR(t)``.

Every metric is read off one curve: the cumulative ID and OOD counts at each distinct
score, scanned from the highest score down (one sort of the pooled scores), so `evaluate`
costs one sort for all five numbers.

Confidence intervals come from one percentile bootstrap, `bootstrap_replicates`: each
replicate resamples the ID scores and every OOD set independently with replacement. A
replicate is a set of multinomial counts over the samples ranked once, so it costs O(n),
not a sort. `evaluate(ci=True)` and `bootstrap_ci` are views of it.

Inputs are checked: non-numeric input (strings, objects, ragged lists), NaN/inf scores or
an empty ID or OOD array raise ``ValueError``; so do ``n_boot < 1`` when an interval is
asked for and ``alpha`` outside (0, 1). Constant scores give AUROC 0.5 and FPR@95 1.0
(every OOD sample is accepted).
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "as_scores",
    "auroc",
    "fpr_at_tpr",
    "fpr_at_95_tpr",
    "ood_rejected_at_95_ood_recall",
    "aupr_in",
    "aupr_out",
    "detection_error",
    "accuracy",
    "evaluate",
    "bootstrap_ci",
    "bootstrap_replicates",
    "threshold_at_tpr",
    "CI_METRICS",
]

#: Metrics that `evaluate(ci=True)` gives intervals for (``<name>_lo`` / ``<name>_hi``).
CI_METRICS = ("auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out")


# --------------------------------------------------------------------------- input checks
def as_scores(x, name: str = "scores") -> np.ndarray:
    """A finite float64 vector, or a ValueError that names the argument (``name``)."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise ValueError(f"{name} must be a 1-D array of numbers; could not read it ({err}).") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{name} must hold numbers (bool, int or float), got dtype {arr.dtype}"
            + (" (strings: convert them with float() first)" if arr.dtype.kind in "US" else "")
            + "."
        )
    arr = arr.astype(np.float64, copy=False).reshape(-1)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf values; metrics on such scores would be meaningless."
        )
    return arr


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    a = as_scores(id_scores, "id_scores")
    b = as_scores(ood_scores, "ood_scores")
    if a.size == 0 or b.size == 0:
        raise ValueError(
            f"Metrics need at least one ID and one OOD score (got {a.size} ID, {b.size} OOD)."
        )
    return a, b


def _check_n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(
            f"n_boot must be a positive integer (the number of bootstrap resamples), got {n_boot!r}; "
            "pass ci=False for point estimates without an interval."
        )
    return int(n_boot)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(
            f"alpha must be in (0, 1) (e.g. 0.05 for a 95% interval), got {alpha!r}."
        )
    return float(alpha)


# --------------------------------------------------------------------------- the curve
def _curve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ID / OOD counts ``(tp, fp)`` accepted at each distinct score, descending.

    ``tp[i]`` is the number of ID scores ``>= t_i`` for the i-th largest distinct score
    ``t_i``. Sorting each side and merging the two sorted runs is the one sort; the counts
    come from searches of sorted queries, which stay cache-friendly.
    """
    sa, sb = np.sort(a), np.sort(b)
    pooled = np.concatenate([sa, sb])
    pooled.sort(kind="stable")  # merges two sorted runs in linear time
    distinct = pooled[np.r_[True, pooled[1:] != pooled[:-1]]][::-1]
    tp = a.size - np.searchsorted(sa, distinct, side="left")
    fp = b.size - np.searchsorted(sb, distinct, side="left")
    return tp.astype(np.float64), fp.astype(np.float64)


def _auroc_of(tp, fp, n_id, n_ood) -> float:
    tpr = np.r_[0.0, tp / n_id]
    fpr = np.r_[0.0, fp / n_ood]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _fpr_of(tp, fp, n_id, n_ood, tpr: float = 0.95) -> float:
    # the first threshold (from the top) keeping at least k ID samples; ties are accepted
    k = max(np.ceil(tpr * n_id - 1e-12), 1.0)
    return float(fp[np.searchsorted(tp, k - 1e-9)] / n_ood)


def _average_precision_of(tp, fp, n_pos) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)  # zero-weight groups (bootstrap)
    return float(np.sum(np.diff(np.r_[0.0, tp]) / n_pos * precision))


def _aupr_in_of(tp, fp, n_id, n_ood) -> float:
    return _average_precision_of(tp, fp, n_id)


def _aupr_out_of(tp, fp, n_id, n_ood) -> float:
    # OOD positive ranks by ascending score: the counts at or below each distinct score
    tp_out = n_ood - np.r_[0.0, fp[:-1]][::-1]
    fp_out = n_id - np.r_[0.0, tp[:-1]][::-1]
    return _average_precision_of(tp_out, fp_out, n_ood)


def _detection_error_of(tp, fp, n_id, n_ood) -> float:
    # thresholds: every distinct score, and +inf (accept nothing: error 0.5)
    return float(min(0.5, np.min(0.5 * (1.0 - tp / n_id) + 0.5 * fp / n_ood)))


_FROM_CURVE: dict[str, Callable[..., float]] = {
    "auroc": _auroc_of,
    "fpr_at_95_tpr": _fpr_of,
    "aupr_in": _aupr_in_of,
    "aupr_out": _aupr_out_of,
    "detection_error": _detection_error_of,
}


def _curve_metrics(tp, fp, n_id: float, n_ood: float, names: Sequence[str] = tuple(_FROM_CURVE)) -> dict[str, float]:
    return {m: _FROM_CURVE[m](tp, fp, n_id, n_ood) for m in names}


# --------------------------------------------------------------------------- metrics
def auroc(id_scores, ood_scores) -> float:
    """P(score_id > score_ood) + 0.5·P(tie)."""
    a, b = _check(id_scores, ood_scores)
    return _auroc_of(*_curve(a, b), a.size, b.size)


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """Largest threshold t such that at least ``tpr`` of ID scores are ``>= t``."""
    a = as_scores(id_scores, "id_scores")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    if a.size == 0:
        raise ValueError("threshold_at_tpr needs at least one ID score.")
    s = np.sort(a)[::-1]
    k = int(np.ceil(tpr * a.size - 1e-12))  # number of ID samples to keep
    return float(s[max(k, 1) - 1])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD scores ``>=`` the threshold keeping ``tpr`` of ID samples."""
    a, b = _check(id_scores, ood_scores)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    return _fpr_of(*_curve(a, b), a.size, b.size, tpr)


def fpr_at_95_tpr(id_scores, ood_scores) -> float:
    return fpr_at_tpr(id_scores, ood_scores, 0.95)


def ood_rejected_at_95_ood_recall(id_scores, ood_scores) -> float:
    """OpenOOD v1.5's "FPR@95": OOD is positive; fraction of ID flagged when 95% of OOD is."""
    a, b = _check(id_scores, ood_scores)
    return fpr_at_tpr(-b, -a, 0.95)


def aupr_in(id_scores, ood_scores) -> float:
    a, b = _check(id_scores, ood_scores)
    return _aupr_in_of(*_curve(a, b), a.size, b.size)


def aupr_out(id_scores, ood_scores) -> float:
    a, b = _check(id_scores, ood_scores)
    return _aupr_out_of(*_curve(a, b), a.size, b.size)


def detection_error(id_scores, ood_scores) -> float:
    """Minimum over thresholds of 0.5·(missed ID) + 0.5·(accepted OOD)."""
    a, b = _check(id_scores, ood_scores)
    return _detection_error_of(*_curve(a, b), a.size, b.size)


def accuracy(logits_or_pred, labels) -> float:
    """Classification accuracy from (N, C) logits or (N,) predicted labels."""
    p = np.asarray(logits_or_pred)
    y = np.asarray(labels).reshape(-1)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    if p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"accuracy: {p.shape[0]} predictions vs {y.shape[0]} labels.")
    return float(np.mean(p == y))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "fpr_at_95_tpr": fpr_at_95_tpr,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
    "detection_error": detection_error,
}


# --------------------------------------------------------------------------- bootstrap
def _ranked(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Each sample's tie group, groups numbered by descending score, and the group count."""
    pooled = np.concatenate([a, b])
    order = np.argsort(-pooled, kind="stable")
    ranked = pooled[order]
    group = np.empty(pooled.size, dtype=np.intp)
    group[order] = np.cumsum(np.r_[False, ranked[1:] != ranked[:-1]])
    return group[: a.size], group[a.size :], int(group[order[-1]]) + 1


def bootstrap_replicates(
    id_scores,
    ood_score_list: Sequence,
    n_boot: int,
    seed: int,
    *,
    metrics: Sequence[str] = CI_METRICS,
) -> dict[str, np.ndarray]:
    """Percentile-bootstrap replicates ``metric -> (n_boot, len(ood_score_list))``.

    ``id_scores`` is one array of ID scores, or a list with one per OOD set (stateful
    detectors score the same ID samples differently in each ID/OOD stream); the ID
    resampling is shared anyway.

    Each replicate draws the ID resample once (shared by every OOD set, so a mean over OOD
    sets gets a joint interval), then each OOD set's resample, in that order, from
    ``numpy.random.default_rng(seed)``: with one OOD set the replicates are those of
    resampling ``id_scores[idx_id]`` and ``ood[idx_ood]`` and calling the metric functions.
    ``metrics`` chooses among ``auroc, fpr_at_95_tpr, aupr_in, aupr_out, detection_error``.
    """
    n_boot = _check_n_boot(n_boot)
    unknown = [m for m in metrics if m not in _FROM_CURVE]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {sorted(_FROM_CURVE)}.")
    oods = [as_scores(b, f"ood_score_list[{j}]") for j, b in enumerate(ood_score_list)]
    if isinstance(id_scores, (list, tuple)) and id_scores and np.ndim(id_scores[0]) == 1:
        id_list = [as_scores(a, f"id_scores[{j}]") for j, a in enumerate(id_scores)]
        if len(id_list) != len(oods):
            raise ValueError(f"{len(id_list)} ID score arrays for {len(oods)} OOD sets; give one array or one per set.")
    else:
        id_list = [as_scores(id_scores, "id_scores")] * len(oods)
    n_a = id_list[0].size if id_list else 0
    if any(a.size != n_a for a in id_list):
        raise ValueError("Per-OOD-set ID scores must all score the same ID samples (equal lengths).")
    if oods and (n_a == 0 or any(b.size == 0 for b in oods)):
        raise ValueError("Bootstrap needs at least one ID score and one score in every OOD set.")
    ranked = [_ranked(a, b) for a, b in zip(id_list, oods)]
    out = {m: np.empty((n_boot, len(oods))) for m in metrics}
    rng = np.random.default_rng(seed)
    for i in range(n_boot):
        idx_id = rng.integers(0, n_a, n_a)
        for j, (g_id, g_ood, n_groups) in enumerate(ranked):
            n_b = g_ood.size
            idx_ood = rng.integers(0, n_b, n_b)
            tp = np.cumsum(np.bincount(g_id[idx_id], minlength=n_groups)).astype(np.float64)
            fp = np.cumsum(np.bincount(g_ood[idx_ood], minlength=n_groups)).astype(np.float64)
            for m, v in _curve_metrics(tp, fp, float(n_a), float(n_b), metrics).items():
                out[m][i, j] = v
    return out


def _interval(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    id_scores,
    ood_scores,
    metric: str = "auroc",
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of one metric (by name), from `bootstrap_replicates`."""
    if not isinstance(metric, str) or metric not in _FROM_CURVE:
        raise ValueError(f"metric must be one of {sorted(_FROM_CURVE)}, got {metric!r}.")
    alpha = _check_alpha(alpha)
    a, b = _check(id_scores, ood_scores)
    reps = bootstrap_replicates(a, [b], n_boot, seed, metrics=(metric,))
    return _interval(reps[metric][:, 0], alpha)


def evaluate(
    id_scores,
    ood_scores,
    *,
    ci: bool = False,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics as a dict; with ``ci=True`` also ``<metric>_lo`` / ``<metric>_hi``
    for the metrics in `CI_METRICS` (a ``1 - alpha`` percentile bootstrap interval)."""
    a, b = _check(id_scores, ood_scores)
    alpha = _check_alpha(alpha)
    out = _curve_metrics(*_curve(a, b), float(a.size), float(b.size))
    if ci:
        reps = bootstrap_replicates(a, [b], n_boot, seed)
        for name, r in reps.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = _interval(r[:, 0], alpha)
    return out
