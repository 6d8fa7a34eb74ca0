"""OpenMax (Bendale & Boult, CVPR 2016): logits recalibrated with per-class Weibull models
of the distances to the class mean activation vectors, plus an explicit "unknown" class.

The Weibull fits follow libMR's ``FitHigh`` (the library the authors' code uses): the
``tail_size`` largest distances of a class are shifted by ``translate − smallest tail value``
and fitted by maximum likelihood with a two-parameter Weibull; a query's w-score is the CDF of
its shifted distance. Everything is float64 and stored as arrays.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.optimize import brentq

from .._numeric import log_softmax
from .._params import store_params
from ..features import Features
from ._checks import check_int, check_real
from .base import Detector, register

__all__ = ["OpenMax", "fit_weibull_high", "weibull_cdf"]


def fit_weibull_high(tail: np.ndarray, translate: float = 10000.0) -> tuple[float, float, float]:
    """``(shape, log_scale, shift)`` of libMR's FitHigh on ``tail`` (the largest values).

    The data are moved to ``x = tail + translate − min(tail)`` (all positive) and a Weibull
    ``F(x) = 1 − exp(−(x/λ)^k)`` is fitted by maximum likelihood. The shape solves
    ``Σ wᵢ yᵢ / Σ wᵢ − 1/k − mean(y) = 0`` with ``y = log x`` and ``wᵢ = x_iᵏ`` (computed
    relative to the largest ``y``, so ``xᵏ`` never overflows even for the very large shapes
    the translation produces); ``shift = translate − min(tail)``.
    """
    t = np.asarray(tail, dtype=np.float64)
    shift = float(translate) - float(t.min())
    y = np.log(t + shift)
    centred = y - y.mean()
    top = centred.max()
    if not top > 0:  # all tail values equal: a step at that value
        return np.inf, float(y.mean()), shift

    def equation(log_k: float) -> float:
        k = np.exp(log_k)
        w = np.exp(k * (centred - top))
        return float(np.dot(w, centred) / w.sum() - 1.0 / k)

    lo, hi = -20.0, 60.0
    log_k = brentq(equation, lo, hi, xtol=1e-12, maxiter=500) if equation(hi) > 0 else hi
    k = float(np.exp(log_k))
    y_max = float(y.max())
    log_scale = y_max + np.log(np.mean(np.exp(k * (y - y_max)))) / k
    return k, float(log_scale), shift


def weibull_cdf(x: np.ndarray, shape: float, log_scale: float, shift: float) -> np.ndarray:
    """CDF of a model from `fit_weibull_high` at raw (unshifted) values ``x``."""
    z = np.asarray(x, dtype=np.float64) + shift
    out = np.zeros(z.shape)
    pos = z > 0
    if np.isinf(shape):
        out[pos] = (np.log(z[pos]) >= log_scale).astype(np.float64)
        return out
    with np.errstate(over="ignore"):
        power = np.exp(np.clip(shape * (np.log(z[pos]) - log_scale), -745.0, 700.0))
    out[pos] = -np.expm1(-power)
    return out


def _distances(z: np.ndarray, means: np.ndarray, kind: str, eu_weight: float) -> np.ndarray:
    """(N, C) distances of logit vectors to the class mean activation vectors."""
    diff = z[:, None, :] - means[None, :, :]
    eu = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    if kind == "euclidean":
        return eu
    zn = np.linalg.norm(z, axis=1, keepdims=True)
    mn = np.linalg.norm(means, axis=1)[None, :]
    denom = zn * mn
    cos = np.divide(z @ means.T, denom, out=np.zeros((len(z), len(means))), where=denom > 0)
    cosine = 1.0 - cos
    return cosine if kind == "cosine" else eu_weight * eu + cosine


@register("openmax")
class OpenMax(Detector):
    """OpenMax: open-set recognition by Weibull recalibration of the logits.

    ``fit``: per class ``c``, the mean activation vector ``MAV_c`` is the mean logit vector of
    the training samples of class ``c`` that the network classifies correctly; a Weibull model
    (libMR ``FitHigh``, see `fit_weibull_high`) is fitted to the ``tail_size`` largest
    distances of those samples to ``MAV_c``. Scoring: for the ``alpha`` top-ranked classes
    with weights ``ω = 1, (α−1)/α, …, 1/α``, ``ẑ_c = z_c (1 − ω_c w_c)`` where ``w_c`` is the
    Weibull CDF of ``d(z, MAV_c)``, the unknown class gets ``ẑ_0 = Σ_c (z_c − ẑ_c)``, and the
    OpenMax probabilities are the softmax over ``(ẑ_0, ẑ_1, …, ẑ_C)``. Score
    ``−log P(unknown)`` (higher = in-distribution; monotone in ``1 − P(unknown)`` but without
    its rounding to 1).

    The rank weights ``ω = 1, (α−1)/α, …, 1/α`` and the ``w_c`` = Weibull CDF follow the
    authors' code (also OpenOOD's and pytorch-ood's), not the printed Algorithm 2.

    ``distance``: ``"eucos"`` (the authors' ``euclidean/200 + cosine``, ``eu_weight=1/200``),
    ``"euclidean"`` (OpenOOD's choice) or ``"cosine"``. Classes without correctly classified
    training samples keep their logit (``w_c = 0``).
    """

    requires = frozenset({"logits"})
    fit_fields = frozenset({"logits", "labels"})
    search_space: ClassVar[dict[str, list[Any]]] = {
        "tail_size": [10, 20, 50],
        "alpha": [1, 2, 3, 5],
        "distance": ["eucos", "euclidean"],
    }
    score_params = frozenset({"alpha"})
    reference = "Bendale & Boult, Towards Open Set Deep Networks (OpenMax), CVPR 2016"

    def __init__(self, tail_size: int = 20, alpha: int = 3, distance: str = "eucos",
                 eu_weight: float = 1.0 / 200.0, translate: float = 10000.0):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_int(self, "tail_size", self.tail_size)
        check_int(self, "alpha", self.alpha)
        if self.distance not in ("eucos", "euclidean", "cosine"):
            raise ValueError(f"OpenMax: distance must be 'eucos', 'euclidean' or 'cosine', got {self.distance!r}.")
        check_real(self, "eu_weight", self.eu_weight, strict=True)
        check_real(self, "translate", self.translate, strict=True)

    def _fit(self, train: Features) -> None:
        z = np.asarray(train.logits, dtype=np.float64)
        c = z.shape[1]
        correct = np.argmax(z, axis=1) == train.labels
        means = np.zeros((c, c))
        weibull = np.zeros((c, 3))  # shape, log scale, shift per class
        fitted = np.zeros(c, dtype=bool)
        for k in range(c):
            rows = np.flatnonzero(correct & (train.labels == k))
            if len(rows) == 0:
                continue
            means[k] = z[rows].mean(axis=0)
            dist = _distances(z[rows], means[k : k + 1], self.distance, float(self.eu_weight))[:, 0]
            tail = np.sort(dist)[-int(self.tail_size):]
            weibull[k] = fit_weibull_high(tail, float(self.translate))
            fitted[k] = True
        if not fitted.any():
            raise ValueError(
                "OpenMax.fit: no training sample is classified correctly by the network, so no "
                "class has a mean activation vector; check that labels and logits belong together."
            )
        self.mean_vectors_ = means
        self.weibull_ = weibull
        self.fitted_classes_ = fitted

    def recalibrated_logits(self, logits: np.ndarray) -> np.ndarray:
        """(N, C + 1) OpenMax logits, the unknown class first."""
        z = np.asarray(logits, dtype=np.float64)
        n, c = z.shape
        w = np.zeros((n, c))
        dist = _distances(z, self.mean_vectors_, self.distance, float(self.eu_weight))
        for k in np.flatnonzero(self.fitted_classes_):
            shape, log_scale, shift = self.weibull_[k]
            w[:, k] = weibull_cdf(dist[:, k], shape, log_scale, shift)
        alpha = min(int(self.alpha), c)
        ranked = np.argsort(-z, axis=1, kind="stable")[:, :alpha]
        omega = np.zeros((n, c))
        np.put_along_axis(omega, ranked, (alpha - np.arange(alpha)) / alpha, axis=1)
        kept = z * (1.0 - omega * w)
        unknown = (z - kept).sum(axis=1, keepdims=True)
        return np.hstack([unknown, kept])

    def _score(self, x: Features) -> np.ndarray:
        return -log_softmax(self.recalibrated_logits(x.logits), axis=1)[:, 0]
