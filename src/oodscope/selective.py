"""Selective prediction: how well a score orders a classifier's right and wrong answers.

A selective classifier answers only the inputs whose confidence score is at least a
threshold and abstains on the rest. Lowering the threshold raises the *coverage* (the
fraction answered) and usually the *selective risk* (the error rate among the answered).
The risk-coverage curve traces that trade-off for every threshold, and its area (AURC,
Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017;
Geifman et al., "Bias-Reduced Uncertainty Estimation", ICLR 2019) summarises it: lower is
better. Any detector's score works (higher = more in-distribution = more trusted).
The figure is `oodscope.report.plots.risk_coverage_png`.

Ties: inputs with the same score are accepted or rejected together, so the curve has one
point per distinct score, and AURC is the expected area when tied inputs are answered in a
random order (errors spread evenly over a tied block), so it does not depend on how the
input happened to be ordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import as_scores

__all__ = ["RiskCoverage", "risk_coverage_curve", "aurc", "excess_aurc", "optimal_aurc",
           "risk_at_coverage", "coverage_at_risk", "correct_predictions", "selective_metrics",
           "SELECTIVE_COVERAGES"]

#: coverages at which `selective_metrics` reports the selective risk
SELECTIVE_COVERAGES = (0.5, 0.8, 0.9)


@dataclass(frozen=True)
class RiskCoverage:
    """The risk-coverage curve: one point per distinct score, highest score first.

    ``coverage[i]`` is the fraction of inputs with score ``>= thresholds[i]``, ``risk[i]`` the
    error rate among them; ``accuracy`` is ``1 - risk``.
    """

    coverage: np.ndarray
    risk: np.ndarray
    thresholds: np.ndarray

    @property
    def accuracy(self) -> np.ndarray:
        return 1.0 - self.risk


def _check(scores, correct) -> tuple[np.ndarray, np.ndarray]:
    s = as_scores(scores, "scores")
    c = np.asarray(correct)
    if c.dtype.kind not in "biu" and not (c.dtype.kind == "f" and np.all(np.isin(c, (0.0, 1.0)))):
        raise ValueError(
            f"correct must be booleans (True = the prediction was right) or 0/1, got dtype {c.dtype}"
            + (" with values other than 0 and 1" if c.dtype.kind == "f" else "")
            + "; build it with oodscope.selective.correct_predictions(logits, labels)."
        )
    c = c.reshape(-1)
    if c.dtype.kind in "iu" and c.size and not np.all(np.isin(c, (0, 1))):
        raise ValueError("correct must hold only 0 and 1 (or booleans).")
    if s.size != c.size:
        raise ValueError(f"scores and correct differ in length ({s.size} vs {c.size}); "
                         "give one correctness flag per scored input.")
    if s.size == 0:
        raise ValueError("Selective-prediction metrics need at least one scored input, got 0.")
    return s, c.astype(bool)


def correct_predictions(logits_or_pred, labels) -> np.ndarray:
    """``argmax(logits) == labels`` (or ``pred == labels``) as a boolean vector.

    Labels must be known class indices: OOD inputs (label -1) have no right answer, so a
    risk-coverage curve is computed on in-distribution inputs (or on a mixed set with an
    explicit ``correct`` that counts every answered OOD input as an error).
    """
    pred = np.asarray(logits_or_pred)
    labels = np.asarray(labels).reshape(-1)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    pred = pred.reshape(-1)
    if pred.size != labels.size:
        raise ValueError(f"{pred.size} predictions but {labels.size} labels.")
    if labels.size and labels.min() < 0:
        raise ValueError("labels contain negative (unknown/OOD) entries: correctness is undefined "
                         "for them; pass in-distribution inputs, or build `correct` yourself.")
    return pred == labels


def _blocks(s: np.ndarray, c: np.ndarray):
    """Sorted by score descending: distinct thresholds, cumulative counts and errors at each."""
    order = np.argsort(-s, kind="stable")
    ss, err = s[order], (~c[order]).astype(np.float64)
    last = np.r_[ss[1:] != ss[:-1], True]  # the last index of each block of equal scores
    n_at = np.flatnonzero(last) + 1.0
    e_at = np.cumsum(err)[last]
    return ss[last], n_at, e_at


def risk_coverage_curve(scores, correct) -> RiskCoverage:
    """The risk-coverage curve of ``scores`` (higher = answer) for predictions ``correct``."""
    s, c = _check(scores, correct)
    thr, n_at, e_at = _blocks(s, c)
    return RiskCoverage(coverage=n_at / s.size, risk=e_at / n_at, thresholds=thr)


def aurc(scores, correct) -> float:
    """Area under the risk-coverage curve, ``(1/n) Σ_k risk(top-k)`` (lower is better).

    Within a block of tied scores the errors are spread evenly (the expectation under a
    random order of the tied inputs)."""
    s, c = _check(scores, correct)
    _, n_at, e_at = _blocks(s, c)
    n_prev = np.r_[0.0, n_at[:-1]]
    e_prev = np.r_[0.0, e_at[:-1]]
    size = (n_at - n_prev).astype(np.int64)
    k = np.arange(1, s.size + 1, dtype=np.float64)
    k0, e0 = np.repeat(n_prev, size), np.repeat(e_prev, size)
    slope = np.repeat((e_at - e_prev) / size, size)  # errors per answered input in the block
    return float(np.mean((e0 + slope * (k - k0)) / k))


def optimal_aurc(correct) -> float:
    """AURC of a score that ranks every right answer above every wrong one."""
    c = np.asarray(correct).astype(bool).reshape(-1)
    if c.size == 0:
        raise ValueError("optimal_aurc needs at least one prediction, got 0.")
    return aurc(c.astype(float), c)


def excess_aurc(scores, correct) -> float:
    """E-AURC: AURC minus the best AURC possible at this error rate (0 = perfect ordering)."""
    return aurc(scores, correct) - optimal_aurc(correct)


def risk_at_coverage(scores, correct, coverage: float) -> float:
    """Selective risk when answering the top ``coverage`` fraction (ties broken by the curve:
    the first threshold whose coverage reaches the target)."""
    if not 0.0 < float(coverage) <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}.")
    curve = risk_coverage_curve(scores, correct)
    i = int(np.searchsorted(curve.coverage, float(coverage) - 1e-12, side="left"))
    return float(curve.risk[min(i, curve.risk.size - 1)])


def coverage_at_risk(scores, correct, risk: float) -> float:
    """The largest coverage whose selective risk is at most ``risk`` (0 if none is)."""
    if not 0.0 <= float(risk) <= 1.0:
        raise ValueError(f"risk must be in [0, 1], got {risk!r}.")
    curve = risk_coverage_curve(scores, correct)
    ok = curve.risk <= float(risk) + 1e-12
    return float(curve.coverage[ok].max()) if ok.any() else 0.0


def selective_metrics(scores, correct, coverages=SELECTIVE_COVERAGES) -> dict[str, float]:
    """AURC, E-AURC and the selective risk at each of ``coverages`` (keys ``risk_at_90`` for
    0.9) of one score, plus the risk at full coverage (the error rate, the same for every score)."""
    out = {"aurc": aurc(scores, correct), "e_aurc": excess_aurc(scores, correct)}
    for cov in coverages:
        out[f"risk_at_{round(100 * cov)}"] = risk_at_coverage(scores, correct, cov)
    out["risk_at_100"] = float(1.0 - np.mean(np.asarray(correct).astype(bool)))
    return out
