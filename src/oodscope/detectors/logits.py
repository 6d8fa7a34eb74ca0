"""Detectors that read only the logits.

Working precision: **float64** for every detector here, whatever the logits' dtype. float16
and float32 logits are widened block by block (a block stays in cache), never as a whole
float64 copy. One precision means float32 and float64 copies of the same logits get the
same scores; float32 arithmetic is not enough for softmax scores of low-magnitude logits
(at logit scale 1e-4 the float32 entropy and GEN scores were mostly rounding noise, and
MSP/energy off by 0.05 % of their spread).
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp as _lse

from .._numeric import log_softmax, logsumexp
from ..features import Features
from ._checks import check_less, check_real
from .base import Detector, register

#: Rows per block when a computation materialises an (n, C) or (n, K) float64 array.
_CHUNK_ELEMENTS = 1 << 22


def _row_blocks(n: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


#: Rows per block for the per-sample softmax passes: a block stays in cache between the
#: max, subtract, exp and sum passes (256K elements, 2 MiB in float64).
_CACHE_ELEMENTS = 1 << 18


def _cache_blocks(n: int, width: int):
    step = max(1, _CACHE_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


#: Below this many classes numpy's per-row reductions are dominated by per-row overhead;
#: such blocks are transposed to (classes, rows) and reduced along axis 0 instead (~6x
#: faster for 10 classes).
_NARROW = 64


def _shifted(z: np.ndarray, inv_t: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Row max ``m`` and ``(z − m)/T`` (≤ 0, 0 at the max), both float64, and the class
    axis of that array: 1, or 0 for narrow blocks, which are transposed."""
    if z.shape[1] < _NARROW:
        y = np.array(z.T, dtype=np.float64, order="C")
        m = y.max(axis=0)
        y -= m
        axis = 0
    else:
        m = z.max(axis=1).astype(np.float64)
        y = np.subtract(z, m[:, None], dtype=np.float64)
        axis = 1
    if inv_t != 1.0:
        y *= inv_t
    return m, y, axis


def _max_logit(logits: np.ndarray) -> np.ndarray:
    """Row max in the input dtype (exact), widened to float64."""
    if logits.shape[1] < _NARROW:
        out = np.empty(len(logits))
        for rows in _cache_blocks(len(logits), logits.shape[1]):
            out[rows] = np.ascontiguousarray(logits[rows].T).max(axis=0)
        return out
    return logits.max(axis=1).astype(np.float64)


def _msp(logits: np.ndarray, temperature: float) -> np.ndarray:
    out = np.empty(len(logits))
    for rows in _cache_blocks(len(logits), logits.shape[1]):
        _, y, ax = _shifted(logits[rows], 1.0 / temperature)
        # max softmax = exp(0) / Σ exp((z − max)/T), without forming the whole softmax
        out[rows] = 1.0 / np.exp(y, out=y).sum(axis=ax)
    return out


@register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)."""

    requires = frozenset({"logits"})
    reference = (
        "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"
    )

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        check_real(self, "temperature", self.temperature, 0, strict=True)

    def _score(self, x: Features) -> np.ndarray:
        return _msp(x.logits, self.temperature)


@register("maxlogit", "mls")
class MaxLogit(Detector):
    """Maximum logit score, ``max_c f_c(x)`` (Hendrycks et al., ICML 2022)."""

    requires = frozenset({"logits"})
    reference = (
        "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"
    )

    def _score(self, x: Features) -> np.ndarray:
        # the max is exact in the input dtype; only the (n,) result is widened
        return _max_logit(np.asarray(x.logits))


@register("energy")
class Energy(Detector):
    """Negative free energy ``T·logsumexp(f/T)`` (Liu et al., NeurIPS 2020)."""

    requires = frozenset({"logits"})
    search_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.5, 1.0, 2.0, 5.0]}
    reference = "Liu et al., Energy-based Out-of-distribution Detection, NeurIPS 2020"

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        check_real(self, "temperature", self.temperature, 0, strict=True)

    def _score(self, x: Features) -> np.ndarray:
        logits, t = x.logits, self.temperature
        out = np.empty(len(logits))
        for rows in _cache_blocks(len(logits), logits.shape[1]):
            m, y, ax = _shifted(logits[rows], 1.0 / t)
            out[rows] = m + t * np.log(np.exp(y, out=y).sum(axis=ax))
        return out


@register("entropy")
class Entropy(Detector):
    """Negative Shannon entropy of the softmax, ``Σ_c p_c log p_c`` (0 for a one-hot prediction).

    The predictive-entropy baseline used throughout the uncertainty literature (e.g. as the
    "softmax entropy" baseline of Lakshminarayanan et al., NeurIPS 2017).
    """

    requires = frozenset({"logits"})
    reference = (
        "Shannon entropy of the softmax; e.g. Lakshminarayanan et al., Deep Ensembles, NeurIPS 2017"
    )

    def _score(self, x: Features) -> np.ndarray:
        logits = x.logits
        out = np.empty(len(logits))
        for rows in _cache_blocks(len(logits), logits.shape[1]):
            _, y, ax = _shifted(logits[rows], 1.0)
            e = np.exp(y)
            s = e.sum(axis=ax)
            # Σ p log p with p = e/s and log p = y − log s
            ey = np.einsum("ij,ij->i" if ax == 1 else "ij,ij->j", e, y)
            out[rows] = ey / s - np.log(s)
        return out


@register("gen")
class GEN(Detector):
    """Generalized ENtropy (Liu, Lochman & Zach, CVPR 2023).

    ``G_γ(p) = Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ`` over the ``M`` largest softmax probabilities;
    the score is ``−G_γ``. ``γ = 1`` with ``M = C`` gives the Gini impurity ``1 − Σ p²``; as
    ``γ → 0``, ``(G_γ − M)/γ → Σ log(p_j (1 − p_j))``. ``top_m`` larger than the number of
    classes means all classes.
    """

    requires = frozenset({"logits"})
    search_space: ClassVar[dict[str, list[Any]]] = {
        "gamma": [0.01, 0.05, 0.1, 0.5, 1.0],
        "top_m": [5, 10, 50, 100],
    }
    reference = (
        "Liu, Lochman & Zach, GEN: Pushing the Limits of Softmax-Based OOD Detection, CVPR 2023"
    )

    def __init__(self, gamma: float = 0.1, top_m: int = 100):
        self.gamma = gamma
        self.top_m = top_m

    def _check_params(self) -> None:
        check_real(self, "gamma", self.gamma, 0, strict=True)
        if (
            isinstance(self.top_m, bool)
            or not isinstance(self.top_m, numbers.Integral)
            or self.top_m < 1
        ):
            raise ValueError(f"GEN: top_m must be an integer >= 1, got {self.top_m!r}.")

    def _score(self, x: Features) -> np.ndarray:
        logits = x.logits
        c = logits.shape[1]
        m = min(int(self.top_m), c)
        out = np.empty(len(logits))
        gamma = float(self.gamma)
        for rows in _cache_blocks(len(logits), c):
            _, e, ax = _shifted(logits[rows], 1.0)
            np.exp(e, out=e)
            idx = np.arange(e.shape[1 - ax])
            # the top class has e = exp(0) = 1; zero it so the other classes' mass is summed
            # directly: 1 − p_top = others/(1 + others) stays exact when p_top rounds to 1
            top_class = e.argmax(axis=ax)
            if ax == 1:
                e[idx, top_class] = 0.0
            else:
                e[top_class, idx] = 0.0
            others = e.sum(axis=ax)
            total = 1.0 + others
            top = (others / total**2) ** gamma  # (p_top (1 − p_top))^γ
            if m > 1:
                # order inside the top M does not matter for a sum; other classes have
                # p ≤ 1/2, so 1 − p needs no correction
                if m < c:
                    kth = c - (m - 1)
                    e = np.partition(e, kth, axis=ax)
                    e = e[:, kth:] if ax == 1 else e[kth:]
                scale = 1.0 / total
                p = e * (scale[:, None] if ax == 1 else scale)
                p *= 1.0 - p
                top = top + np.sum(p**gamma, axis=ax)
            out[rows] = -top
        return out


@register("klm", "kl_matching")
class KLMatching(Detector):
    """KL matching (Hendrycks et al., ICML 2022).

    ``fit`` averages the softmax of the ID samples predicted as each class into a template
    ``d_c``; the score is ``−min_c KL(p(x) ‖ d_c)`` over classes that were predicted at least
    once. Templates are averaged in log space (log-mean-exp of log-softmax) so they never
    underflow to zero, which keeps every KL finite.
    """

    requires = frozenset({"logits"})
    fit_fields = frozenset({"logits"})
    reference = (
        "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"
    )

    def _fit(self, train: Features) -> None:
        logits = train.logits
        pred = np.asarray(logits).argmax(axis=1)
        order = np.argsort(pred, kind="stable")
        classes, starts = np.unique(pred[order], return_index=True)
        templates = np.empty((len(classes), logits.shape[1]))
        for i, group in enumerate(np.split(order, starts[1:])):
            logp = log_softmax(logits[group], axis=1)
            templates[i] = _lse(logp, axis=0) - np.log(len(group))
        self.template_classes_ = classes
        self.log_templates_ = templates

    def _score(self, x: Features) -> np.ndarray:
        logits = x.logits
        out = np.empty(len(logits))
        for rows in _row_blocks(len(logits), max(logits.shape[1], len(self.log_templates_))):
            logp = log_softmax(logits[rows], axis=1)
            p = np.exp(logp)
            # KL(p ‖ d_c) = Σ p log p − Σ p log d_c
            kl = np.sum(p * logp, axis=1, keepdims=True) - p @ self.log_templates_.T
            out[rows] = -kl.min(axis=1)
        return out


@register("tempscale", "temperature_scaling")
class TemperatureScaling(Detector):
    """MSP after temperature scaling (Guo et al., ICML 2017).

    ``fit`` picks the temperature ``T`` minimising the mean negative log-likelihood of the ID
    training labels under ``softmax(f/T)`` with a bounded 1-D search over ``log T`` in
    ``[log t_min, log t_max]`` (float64); the score is the maximum softmax probability at ``T``.
    """

    requires = frozenset({"logits"})
    fit_fields = frozenset({"logits", "labels"})
    reference = "Guo et al., On Calibration of Modern Neural Networks, ICML 2017"

    def __init__(self, t_min: float = 0.01, t_max: float = 100.0):
        self.t_min = t_min
        self.t_max = t_max

    def _check_params(self) -> None:
        check_real(self, "t_min", self.t_min, 0, strict=True)
        check_real(self, "t_max", self.t_max, 0, strict=True)
        check_less(self, "t_min", "t_max")

    def _fit(self, train: Features) -> None:
        logits = train.logits
        true_logit = np.asarray(logits[np.arange(len(logits)), train.labels], dtype=np.float64)

        def nll(log_t: float) -> float:
            inv_t = np.exp(-log_t)
            total = 0.0
            for rows in _row_blocks(len(logits), logits.shape[1]):
                z = np.asarray(logits[rows], dtype=np.float64)
                total += np.sum(logsumexp(z * inv_t, axis=1) - true_logit[rows] * inv_t)
            return total / len(logits)

        res = minimize_scalar(
            nll,
            bounds=(np.log(self.t_min), np.log(self.t_max)),
            method="bounded",
            options={"xatol": 1e-5},
        )
        self.temperature_ = float(np.exp(res.x))
        self.nll_ = float(res.fun)

    def _score(self, x: Features) -> np.ndarray:
        return _msp(x.logits, self.temperature_)
