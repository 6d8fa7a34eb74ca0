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

NaN/inf scores raise ``ValueError``; an empty ID or OOD array raises ``ValueError``;
constant scores give AUROC 0.5 and FPR@95 1.0 (every OOD sample is accepted).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
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
    "threshold_at_tpr",
]


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(
            f"Metrics need at least one ID and one OOD score (got {a.size} ID, {b.size} OOD)."
        )
    for name, arr in (("id_scores", a), ("ood_scores", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"{name} contains {int(np.sum(~np.isfinite(arr)))} NaN/inf values; "
                "metrics on such scores would be meaningless."
            )
    return a, b


def auroc(id_scores, ood_scores) -> float:
    """P(score_id > score_ood) + 0.5·P(tie)."""
    a, b = _check(id_scores, ood_scores)
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))  # average ranks handle ties
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """Largest threshold t such that at least ``tpr`` of ID scores are ``>= t``."""
    a = np.asarray(id_scores, dtype=np.float64).reshape(-1)
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
    t = threshold_at_tpr(a, tpr)
    return float(np.mean(b >= t))


def fpr_at_95_tpr(id_scores, ood_scores) -> float:
    return fpr_at_tpr(id_scores, ood_scores, 0.95)


def ood_rejected_at_95_ood_recall(id_scores, ood_scores) -> float:
    """OpenOOD v1.5's "FPR@95": OOD is positive; fraction of ID flagged when 95% of OOD is."""
    a, b = _check(id_scores, ood_scores)
    return fpr_at_tpr(-b, -a, 0.95)


def _average_precision(pos, neg) -> float:
    """Average precision with positives ranked by descending score (ties grouped)."""
    scores = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, y = scores[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / pos.size
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    a, b = _check(id_scores, ood_scores)
    return _average_precision(a, b)


def aupr_out(id_scores, ood_scores) -> float:
    a, b = _check(id_scores, ood_scores)
    return _average_precision(-b, -a)


def detection_error(id_scores, ood_scores) -> float:
    """Minimum over thresholds of 0.5·(missed ID) + 0.5·(accepted OOD)."""
    a, b = _check(id_scores, ood_scores)
    thresholds = np.unique(np.concatenate([a, b, [np.inf]]))
    a_sorted, b_sorted = np.sort(a), np.sort(b)
    tpr = 1.0 - np.searchsorted(a_sorted, thresholds, side="left") / a.size
    fpr = 1.0 - np.searchsorted(b_sorted, thresholds, side="left") / b.size
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


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


def bootstrap_ci(
    id_scores,
    ood_scores,
    metric: str | Callable = "auroc",
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval, resampling ID and OOD independently."""
    a, b = _check(id_scores, ood_scores)
    fn = METRICS[metric] if isinstance(metric, str) else metric
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        vals[i] = fn(a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)])
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def evaluate(
    id_scores,
    ood_scores,
    *,
    ci: bool = False,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics as a dict; with ``ci=True`` also ``<metric>_lo`` / ``<metric>_hi``."""
    a, b = _check(id_scores, ood_scores)
    out = {name: fn(a, b) for name, fn in METRICS.items()}
    if ci:
        rng = np.random.default_rng(seed)
        boots = {name: np.empty(n_boot) for name in ("auroc", "fpr_at_95_tpr", "aupr_in", "aupr_out")}
        for i in range(n_boot):
            ra = a[rng.integers(0, a.size, a.size)]
            rb = b[rng.integers(0, b.size, b.size)]
            for name in boots:
                boots[name][i] = METRICS[name](ra, rb)
        for name, vals in boots.items():
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out
