"""Activation-shaping detectors: reshape penultimate features (or the head), then energy.

All of them work from cached `Features`: they read ``features`` and the classifier head
(``head_weight``/``head_bias``), change the activations or the weights, recompute the logits
and return the energy score ``logsumexp(logits)`` (temperature 1, as in the papers).
AbeT, the energy-family score of networks trained with a learned temperature head, lives
here too; it reads the logits and the ``temperature`` extra instead of the features.

Features are processed in row blocks so memory stays bounded for large feature banks; the
matrix products run in float32 and the log-sum-exp in float64.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._numeric import logsumexp
from ..features import Features
from ._checks import check_less, check_percentile
from .base import Detector, register

#: Elements per block of features processed at once (about 16 MB of float32).
_BLOCK_ELEMENTS = 1 << 22
#: Above this many training activations, percentiles are estimated on a fixed random subset
#: of rows (seeded, so fits are reproducible) instead of copying the whole bank.
_MAX_PERCENTILE_ELEMENTS = 1 << 25


def _row_blocks(n: int, width: int):
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _rows_for_percentiles(features: np.ndarray) -> np.ndarray:
    """The training features, or a seeded subset of rows when the bank is very large."""
    n, d = features.shape
    max_rows = max(1, _MAX_PERCENTILE_ELEMENTS // max(d, 1))
    if n <= max_rows:
        return np.asarray(features, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(n, size=max_rows, replace=False))
    return np.asarray(features[rows], dtype=np.float32)


def _kept_count(width: int, percentile: float) -> int:
    """How many activations survive pruning at ``percentile`` (at least one)."""
    return max(1, width - int(np.round(width * percentile / 100.0)))


def _zero_all_but_top_k(h: np.ndarray, k: int) -> np.ndarray:
    """Zero, in place, everything except the ``k`` largest entries of each row.

    Values-only partition for each row's k-th largest value, then one mask pass (cheaper
    than argpartition's int64 index array and the scatter). Entries tied with a non-zero
    threshold would keep more than ``k``: those rare rows go through argpartition, which
    keeps exactly ``k`` (zeros tied at a zero threshold change no sum or product).
    """
    n = h.shape[1]
    if k >= n:
        return h
    threshold = np.partition(h, n - k, axis=1)[:, n - k, None]
    below = h < threshold
    np.copyto(h, 0.0, where=below)
    kept = n - np.count_nonzero(below, axis=1)
    tied = np.flatnonzero((kept > k) & (threshold[:, 0] != 0))
    if len(tied):
        sub = h[tied]
        smallest = np.argpartition(sub, n - k, axis=1)[:, : n - k]
        np.put_along_axis(sub, smallest, 0.0, axis=1)
        h[tied] = sub
    return h


def _top_k_sum(h: np.ndarray, k: int) -> np.ndarray:
    """float64 sum of the ``k`` largest entries of each row (values only, no indices)."""
    n = h.shape[1]
    top = h if k >= n else np.partition(h, n - k, axis=1)[:, n - k :]
    return top.sum(axis=1, dtype=np.float64)


class _ShapedEnergy(Detector):
    """Energy of ``scale · (W · shape(h)) + b`` for a per-sample shaping of the features."""

    requires = frozenset({"features", "head"})

    def _shape(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Shaped float32 features (``h`` may be modified) and an optional per-row factor
        multiplying ``W·h`` (not the bias)."""
        raise NotImplementedError

    def _head(self, x: Features) -> tuple[np.ndarray, np.ndarray | None]:
        return x.head_weight, x.head_bias

    def _score(self, x: Features) -> np.ndarray:
        weight, bias = self._head(x)
        w_t = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
        b = None if bias is None else np.asarray(bias, dtype=np.float64)
        feats = x.features
        out = np.empty(len(feats))
        for rows in _row_blocks(len(feats), feats.shape[1]):
            h = np.array(feats[rows], dtype=np.float32)  # a copy: shaping works in place
            h, factor = self._shape(h)
            logits = (h @ w_t).astype(np.float64)
            if factor is not None:
                logits *= factor[:, None]
            if b is not None:
                logits += b
            out[rows] = logsumexp(logits, axis=1)
        return out


@register("react")
class ReAct(_ShapedEnergy):
    """ReAct (Sun, Guo & Li, NeurIPS 2021): clip activations at ``c``, then energy.

    ``c`` is the ``percentile``-th percentile of all ID training activations (every unit of
    every sample pooled). With ``percentile=100`` nothing seen in training is clipped.
    """

    fit_fields = frozenset({"features"})
    search_space: ClassVar[dict[str, list[Any]]] = {"percentile": [80, 85, 90, 95, 99]}
    reference = "Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021"

    def __init__(self, percentile: float = 90):
        self.percentile = percentile

    def _check_params(self) -> None:
        check_percentile(self, "percentile", self.percentile)

    def _fit(self, train: Features) -> None:
        acts = _rows_for_percentiles(train.features).reshape(-1)
        self.threshold_ = float(np.percentile(acts, self.percentile))

    def _shape(self, h):
        return np.minimum(h, np.float32(self.threshold_), out=h), None


class _SamplePercentile(_ShapedEnergy):
    """Shaping driven by each sample's own ``percentile``-th activation percentile (ASH, SCALE)."""

    search_space: ClassVar[dict[str, list[Any]]] = {"percentile": [65, 70, 80, 85, 90, 95]}

    def _check_params(self) -> None:
        check_percentile(self, "percentile", self.percentile, upper_open=True)


class _ASH(_SamplePercentile):
    """Shared parameters of the ASH variants (Djurisic et al., ICLR 2023)."""

    reference = "Djurisic et al., Extremely Simple Activation Shaping for Out-of-Distribution Detection, ICLR 2023"

    def __init__(self, percentile: float = 90):
        self.percentile = percentile


@register("ash_p")
class ASHP(_ASH):
    """ASH-P: per sample, zero the activations below the sample's own ``percentile``-th
    percentile (keep the top ``n − round(n·p/100)``), then energy."""

    def _shape(self, h):
        return _zero_all_but_top_k(h, _kept_count(h.shape[1], self.percentile)), None


@register("ash_b")
class ASHB(_ASH):
    """ASH-B: prune as ASH-P, then set every kept activation to ``s1/k`` (``s1`` the sum of
    all activations of the sample, ``k`` the number kept), so the sum is preserved."""

    def _shape(self, h):
        n = h.shape[1]
        k = _kept_count(n, self.percentile)
        total = h.sum(axis=1, dtype=np.float64)
        # 1 at the kept positions; the common value s1/k goes into the per-row factor.
        mask = np.zeros_like(h)
        if k < n:
            top = np.argpartition(h, n - k, axis=1)[:, n - k :]
            np.put_along_axis(mask, top, 1.0, axis=1)
        else:
            mask[:] = 1.0
        return mask, total / k


def _sum_ratio(total: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """``exp(s1/s2)``; rows whose kept activations sum to 0 (all-zero rows) get factor 1."""
    safe = np.where(pruned != 0, pruned, 1.0)
    ratio = np.where(pruned != 0, total / safe, 0.0)
    with np.errstate(over="ignore"):
        return np.exp(ratio)


@register("ash_s")
class ASHS(_ASH):
    """ASH-S: prune as ASH-P, then multiply the kept activations by ``exp(s1/s2)`` (``s1``,
    ``s2`` the sums before and after pruning), then energy. Assumes non-negative
    (post-ReLU) activations, as the paper does."""

    def _shape(self, h):
        total = h.sum(axis=1, dtype=np.float64)
        pruned = _zero_all_but_top_k(h, _kept_count(h.shape[1], self.percentile))
        return pruned, _sum_ratio(total, pruned.sum(axis=1, dtype=np.float64))


@register("scale")
class SCALE(_SamplePercentile):
    """SCALE (Xu et al., ICLR 2024): multiply the *unpruned* features by ``exp(s1/s2)``,
    with ``s1`` the sum of all activations and ``s2`` the sum of those above the sample's
    ``percentile``-th percentile (the ASH-S factor without the pruning), then energy.
    Like ASH, it assumes non-negative (post-ReLU) activations."""

    reference = "Xu et al., Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement, ICLR 2024"

    def __init__(self, percentile: float = 85):
        self.percentile = percentile

    def _shape(self, h):
        total = h.sum(axis=1, dtype=np.float64)
        kept = _top_k_sum(h, _kept_count(h.shape[1], self.percentile))
        return h, _sum_ratio(total, kept)


@register("dice")
class DICE(_ShapedEnergy):
    """DICE (Sun & Li, ECCV 2022): sparsify the head by contribution, then energy.

    The contribution of weight ``w_cj`` is ``w_cj · mean_j``, with ``mean`` the average ID
    training feature. Only the largest ``100 − sparsity`` percent of contributions keep their
    weight; the rest are set to 0. ``sparsity=0`` is the plain energy score.
    """

    fit_fields = frozenset({"features", "head"})
    search_space: ClassVar[dict[str, list[Any]]] = {"sparsity": [0, 30, 50, 70, 90]}
    reference = (
        "Sun & Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022"
    )

    def __init__(self, sparsity: float = 90):
        self.sparsity = sparsity

    def _check_params(self) -> None:
        check_percentile(self, "sparsity", self.sparsity, upper_open=True)

    def _fit(self, train: Features) -> None:
        mean = np.mean(train.features, axis=0, dtype=np.float64)
        weight = np.asarray(train.head_weight, dtype=np.float64)
        contrib = (weight * mean).reshape(-1)
        keep = _kept_count(contrib.size, self.sparsity)
        mask = np.zeros(contrib.size, dtype=bool)
        mask[np.argpartition(contrib, contrib.size - keep)[contrib.size - keep :]] = True
        self.mask_ = mask.reshape(weight.shape)
        self.fitted_head_ = np.array(train.head_weight, dtype=np.float32)
        self.masked_weight_ = np.where(self.mask_, self.fitted_head_, 0).astype(np.float32)

    def _head(self, x: Features):
        if x.head_weight.shape != self.fitted_head_.shape or not np.array_equal(
            x.head_weight, self.fitted_head_
        ):
            raise ValueError(
                "DICE was fitted with a different classifier head (head_weight does not match); "
                "score Features extracted from the same model."
            )
        return self.masked_weight_, x.head_bias

    def _shape(self, h):
        return h, None


@register("vra")
class VRA(_ShapedEnergy):
    """VRA-P (Xu et al., NeurIPS 2023): piecewise rectification of each unit, then energy.

    Per unit ``j``, activations below ``α_j`` become 0, those above ``β_j`` are clipped to
    ``β_j`` and those in between are kept; ``α_j``/``β_j`` are the ``alpha``-th/``beta``-th
    percentiles of unit ``j`` over the ID training features (defaults from the authors'
    CIFAR-10 setting, quantiles 0.6 and 0.9).
    """

    fit_fields = frozenset({"features"})
    search_space: ClassVar[dict[str, list[Any]]] = {
        "alpha": [40, 50, 60, 70],
        "beta": [85, 90, 95, 99],
    }
    reference = "Xu et al., VRA: Variational Rectified Activation for Out-of-distribution Detection, NeurIPS 2023"

    def __init__(self, alpha: float = 60, beta: float = 90):
        self.alpha = alpha
        self.beta = beta

    def _check_params(self) -> None:
        check_percentile(self, "alpha", self.alpha)
        check_percentile(self, "beta", self.beta)
        check_less(self, "alpha", "beta")

    def _fit(self, train: Features) -> None:
        acts = _rows_for_percentiles(train.features)
        low, high = np.percentile(acts, [self.alpha, self.beta], axis=0)
        self.low_ = low.astype(np.float32)
        self.high_ = high.astype(np.float32)

    def _shape(self, h):
        below = h < self.low_
        np.minimum(h, self.high_, out=h)
        h[below] = 0.0
        return h, None


@register("abet")
class AbeT(Detector):
    """Ablated learned-Temperature Energy (AbeT).

    For a network with a cosine head ``f(x)`` and a learned input-dependent temperature
    ``T(x) ∈ (0, 1]`` (GODIN-style), the score is ``logsumexp_i f_i(x)/T(x)``: the energy of
    the temperature-scaled logits *without* the leading ``T(x)`` factor. With ``T ≡ 1`` it is
    the ordinary energy of ``f``. Needs ``logits`` (the raw cosine outputs ``f``) and the extra
    ``temperature`` of shape ``(N,)`` or ``(N, 1)``.
    """

    requires = frozenset({"logits", "temperature"})
    reference = (
        "LeVine et al., Out-of-Distribution Detection & Applications With Ablated Learned "
        "Temperature Energy, arXiv:2401.12129, 2024"
    )

    def _score(self, x: Features) -> np.ndarray:
        t = np.asarray(x.extras["temperature"], dtype=np.float64)
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 1:
            raise ValueError(
                f"AbeT: extra `temperature` must have shape (N,) or (N, 1), got {t.shape}."
            )
        if np.any(t <= 0):
            raise ValueError(
                f"AbeT: the learned temperature must be > 0; found {int(np.sum(t <= 0))} "
                "values <= 0 (a sigmoid head gives T in (0, 1])."
            )
        return logsumexp(np.asarray(x.logits, dtype=np.float64) / t[:, None], axis=1)
