"""Density-style detectors: class-conditional Gaussian mixtures over feature chunks (HVCM)
and Gram-matrix range checks (Sastry & Oore)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .._params import store_params
from ..features import Features
from ._checks import check_positive_int
from ._stats import batched_shrunk_whitening, iter_chunks, map_chunks, progress
from .base import Detector, register

__all__ = ["ClassChunkGMM", "GramDeviation", "gram_rowsums"]


def _num_classes(train: Features) -> int:
    c = train.num_classes
    return int(c) if c is not None else int(train.labels.max()) + 1


def _chunk_bounds(dim: int, n_chunks: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, dim, n_chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@register("gmm", "hvcm")
class ClassChunkGMM(Detector):
    """Class-conditional Gaussian mixture over feature chunks — the HVCM score.

    The feature vector is cut into K contiguous chunks (``n_chunks``; HVCM's attribute
    vector is K=32 chunks of D/K dims). For class c and chunk k, ``μ_ck`` and ``Σ_ck`` are the
    mean and unbiased covariance of chunk k over class-c training features, and ``Σ_ck`` is
    inverted with scale-relative shrinkage. With mixture weights ``π_ck``

        D(x) = min_c Σ_k π_ck · ½ (x_k − μ_ck)ᵀ Σ_ck⁻¹ (x_k − μ_ck),   S(x) = −D(x).

    ``π`` is uniform (1/K) unless the training Features carry ``extras["mixture_weights"]``
    (N, K) — per-sample softmaxed mixture-weight outputs of an HVCM head — in which case
    ``π_c`` is their class mean (renormalised), a batch version of HVCM's running average.
    Fit statistics stream over chunks of samples in float64.
    """

    requires = frozenset({"features"})
    fit_fields = frozenset({"features", "labels"})
    search_space = {"n_chunks": [1, 2, 4, 8, 16, 32], "shrinkage": [1e-3, 1e-2, 1e-1, 0.3]}
    reference = (
        "Hierarchical Visual Categories Modeling: A Joint Representation Learning and "
        "Density Estimation Framework for Out-of-Distribution Detection, ICCV 2023"
    )

    def __init__(self, n_chunks: int = 8, shrinkage: float = 1e-2, chunk_size: int | None = None):
        self.n_chunks = n_chunks
        self.shrinkage = shrinkage
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        check_positive_int("n_chunks", self.n_chunks)
        if not (isinstance(self.shrinkage, (int, float)) and 0.0 <= self.shrinkage < 1.0):
            raise ValueError(f"shrinkage must be a float in [0, 1), got {self.shrinkage!r}.")
        if self.chunk_size is not None and not (
            isinstance(self.chunk_size, (int, np.integer)) and self.chunk_size >= 1
        ):
            raise ValueError(
                f"chunk_size must be None or a positive integer, got {self.chunk_size!r}."
            )

    def _fit(self, train: Features) -> None:
        n, d = train.features.shape
        if self.n_chunks > d:
            raise ValueError(
                f"n_chunks={self.n_chunks} exceeds the feature width {d}; "
                "use at most one chunk per feature dimension."
            )
        bounds = _chunk_bounds(d, self.n_chunks)
        c = _num_classes(train)
        counts = np.zeros(c, dtype=np.int64)
        refs = np.zeros((c, d))
        has_ref = np.zeros(c, dtype=bool)
        sums = np.zeros((c, d))  # Σ (x − r_c), with r_c a per-class reference for accuracy
        scatters = [np.zeros((c, b - a, b - a)) for a, b in bounds]
        weights = train.extras.get("mixture_weights")
        if weights is not None and (weights.ndim != 2 or weights.shape[1] != self.n_chunks):
            raise ValueError(
                f"extras['mixture_weights'] must have shape (N, n_chunks={self.n_chunks}), "
                f"got {weights.shape}."
            )
        weight_sums = np.zeros((c, self.n_chunks))
        chunks = list(iter_chunks(n, self.chunk_size))
        for sl in progress(chunks, len(chunks), "gmm fit"):
            x = np.asarray(train.features[sl], dtype=np.float64)
            y = train.labels[sl]
            order = np.argsort(y, kind="stable")
            x, y = x[order], y[order]
            present, starts, cnt = np.unique(y, return_index=True, return_counts=True)
            new = present[~has_ref[present]]
            for cls in new:
                refs[cls] = x[y == cls].mean(0)
            has_ref[new] = True
            shifted = x - refs[y]
            counts[present] += cnt
            sums[present] += np.add.reduceat(shifted, starts, axis=0)
            ends = np.append(starts[1:], len(y))
            for cls, s0, s1 in zip(present, starts, ends):
                rows = shifted[s0:s1]
                for (a, b), scatter in zip(bounds, scatters):
                    block = rows[:, a:b]
                    scatter[cls] += block.T @ block
            if weights is not None:
                w = np.asarray(weights[sl], dtype=np.float64)[order]
                weight_sums[present] += np.add.reduceat(w, starts, axis=0)
        seen = np.flatnonzero(counts)
        offsets = sums[seen] / counts[seen, None]
        self.classes_ = seen
        self.means_ = refs[seen] + offsets
        denom = np.maximum(counts[seen] - 1, 1)[:, None, None]
        self.whitening_ = []
        self.whitened_means_ = []
        for (a, b), scatter in zip(bounds, scatters):
            off = offsets[:, a:b]
            cov = (
                scatter[seen] - counts[seen, None, None] * off[:, :, None] * off[:, None, :]
            ) / denom
            cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
            whiten = batched_shrunk_whitening(cov, float(self.shrinkage))  # (C, d_k, d_k)
            self.whitening_.append(whiten)
            self.whitened_means_.append(np.einsum("ci,cij->cj", self.means_[:, a:b], whiten))
        self.bounds_ = bounds
        if weights is not None:
            pi = np.clip(weight_sums[seen], 0.0, None)
            total = pi.sum(1, keepdims=True)
            self.mixture_weights_ = np.where(
                total > 0, pi / np.where(total > 0, total, 1.0), 1.0 / self.n_chunks
            )
        else:
            self.mixture_weights_ = np.full((len(seen), self.n_chunks), 1.0 / self.n_chunks)

    def class_divergences(self, features: np.ndarray) -> np.ndarray:
        """(n, n_classes) ``Σ_k π_ck · ½ MD²_ck`` for each fitted class."""
        n_cls = len(self.classes_)
        rows = max(1, (1 << 22) // max(n_cls * max(b - a for a, b in self.bounds_), 1))

        # one GEMM per chunk k against all classes' whitening matrices side by side
        stacked = [w.transpose(1, 0, 2).reshape(w.shape[1], -1) for w in self.whitening_]

        def one(sl: slice) -> np.ndarray:
            x = np.asarray(features[sl], dtype=np.float64)
            total = np.zeros((len(x), n_cls))
            for k, (a, b) in enumerate(self.bounds_):
                z = (x[:, a:b] @ stacked[k]).reshape(len(x), n_cls, b - a) - self.whitened_means_[
                    k
                ][None]
                total += self.mixture_weights_[:, k][None] * 0.5 * np.einsum("ncj,ncj->nc", z, z)
            return total

        return map_chunks(one, len(features), rows)

    def _score(self, x: Features) -> np.ndarray:
        return -self.class_divergences(x.features).min(axis=1)


# ------------------------------------------------------------------------ Gram
def gram_rowsums(layer: np.ndarray, power: int) -> np.ndarray:
    """Row sums of the p-th order Gram matrix of each sample's layer output, p-th rooted.

    ``layer`` is (N, C, ...) (spatial dims flattened; a (N, D) vector is C=D channels with one
    position). With ``F`` the (C, HW) map raised elementwise to ``p``, the Gram matrix is
    ``G = F Fᵀ`` and its row sums ``G·1 = F (Fᵀ 1)`` cost O(C·HW) — no C×C matrix needed.
    Returns ``sign(r)·|r|^(1/p)``, shape (N, C), float64.

    The rooted row sums are homogeneous of degree 2 in the layer values, so each sample is
    divided by its own max-abs ``m`` before the p-th powers and the result multiplied by
    ``m²``: ``x**10`` can neither overflow (values near 1e30) nor underflow.
    """
    f = np.asarray(layer, dtype=np.float64).reshape(len(layer), layer.shape[1], -1)
    peak = np.max(np.abs(f), axis=(1, 2), keepdims=True) if f.size else np.ones((len(f), 1, 1))
    peak = np.where(peak > 0, peak, 1.0)
    f = (f / peak) ** power
    rows = np.einsum("ncs,ns->nc", f, f.sum(axis=1))
    with np.errstate(over="ignore"):  # beyond ~1e154 the result is inf: caught by the caller
        return np.sign(rows) * np.abs(rows) ** (1.0 / power) * peak[:, 0] ** 2


@register("gram")
class GramDeviation(Detector):
    """Gram-matrix deviations (Sastry & Oore, ICML 2020).

    For every layer l and order p in 1..``max_power``, each sample gets the row sums of its
    p-th order Gram matrix (`gram_rowsums`). Training samples grouped by *predicted* class
    give per-class elementwise minima and maxima. A sample's deviation from its predicted
    class is ``Σ relu(min − g)/|min| + relu(g − max)/|max|``, summed per layer and divided by
    that layer's mean deviation on held-out training samples (``validation_fraction``, whose
    deviations are measured against ranges fitted on the rest); score = −total deviation.

    Layers: the penultimate ``features`` always, plus cached extra layers ``layers`` (names
    of extras such as ``"layer:layer3"``, stored by ``oodscope.extract(..., layers=[...])``);
    ``layers=None`` uses every ``layer:*`` extra present at fit time.
    """

    requires = frozenset({"features", "logits"})
    fit_fields = frozenset({"features", "logits"})
    search_space = {"max_power": [1, 5, 10]}
    reference = (
        "Sastry & Oore, Detecting Out-of-Distribution Examples with Gram Matrices, ICML 2020"
    )

    def __init__(
        self,
        max_power: int = 10,
        layers: Sequence[str] | None = None,
        validation_fraction: float = 0.1,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_positive_int("max_power", self.max_power)
        if not (
            isinstance(self.validation_fraction, float) and 0.0 < self.validation_fraction < 1.0
        ):
            raise ValueError(
                f"validation_fraction must be a float in (0, 1), got {self.validation_fraction!r}."
            )
        if self.layers is not None and (
            isinstance(self.layers, str) or not all(isinstance(s, str) for s in self.layers)
        ):
            raise ValueError(
                "layers must be None or a list of extra names such as ['layer:layer3']."
            )

    def _layer_arrays(self, f: Features, names: Sequence[str]) -> list[np.ndarray]:
        missing = [name for name in names if name not in f.extras]
        if missing:
            raise ValueError(
                f"gram was fitted with extra layers {list(names)} but the Features lack {missing}; "
                "extract them with oodscope.extract(..., layers=[...]) for every split."
            )
        return [f.features, *(f.extras[name] for name in names)]

    def _gram_features(self, layers: list[np.ndarray], sl: slice) -> list[np.ndarray]:
        """Per layer: (n, P·C_l) Gram row sums for orders 1..P, each layer scaled to O(1)."""
        out = []
        for arr, scale in zip(layers, self.layer_scales_):
            x = np.asarray(arr[sl], dtype=np.float64) / scale  # keeps x**10 in range
            out.append(
                np.concatenate([gram_rowsums(x, p) for p in range(1, self.max_power + 1)], axis=1)
            )
        return out

    def _fit(self, train: Features) -> None:
        names = (
            [k for k in train.extras if k.startswith("layer:")]
            if self.layers is None
            else list(self.layers)
        )
        self.layer_names_ = names
        layers = self._layer_arrays(train, names)
        n = len(train)
        scales = []
        for name, arr in zip(["features", *names], layers):
            peak = max(float(np.max(np.abs(arr[sl]))) for sl in iter_chunks(n, self.chunk_size))
            if not peak > 0:
                raise ValueError(
                    f"gram: layer `{name}` is zero for every training sample, so its Gram "
                    "matrices have no range to deviate from (relative deviations are undefined). "
                    "Check the extraction (a dead layer?), or leave that layer out "
                    "(layers=[...] without it)."
                )
            scales.append(peak)
        self.layer_scales_ = scales
        rng = np.random.default_rng(self.seed)
        is_val = np.zeros(n, dtype=bool)
        n_val = int(round(self.validation_fraction * n))
        if n_val < 1 or n - n_val < 1:
            raise ValueError(
                f"gram needs enough training samples to hold out a validation part; got {n}."
            )
        is_val[rng.choice(n, n_val, replace=False)] = True
        c = int(train.logits.shape[1])
        mins = [None] * len(layers)
        maxs = [None] * len(layers)
        for sl in iter_chunks(n, self.chunk_size):
            keep = ~is_val[sl]
            if not keep.any():
                continue
            pred = np.asarray(train.logits[sl]).argmax(1)[keep]
            for i, g in enumerate(self._gram_features(layers, sl)):
                g = g[keep]
                if mins[i] is None:
                    mins[i] = np.full((c, g.shape[1]), np.inf)
                    maxs[i] = np.full((c, g.shape[1]), -np.inf)
                for cls in np.unique(pred):
                    rows = g[pred == cls]
                    mins[i][cls] = np.minimum(mins[i][cls], rows.min(0))
                    maxs[i][cls] = np.maximum(maxs[i][cls], rows.max(0))
        # classes never predicted on training data fall back to the range over all classes
        for i in range(len(layers)):
            empty = ~np.isfinite(mins[i][:, 0])
            mins[i][empty] = np.min(mins[i][~empty], axis=0)
            maxs[i][empty] = np.max(maxs[i][~empty], axis=0)
            # relative deviations need a floor: |min|, |max| can be 0 (dead ReLU channels)
        self.mins_, self.maxs_ = mins, maxs
        self.eps_ = [
            1e-6 * max(float(np.mean(np.abs(np.concatenate([a, b])))), 1e-300)
            for a, b in zip(mins, maxs)
        ]
        val = train[np.flatnonzero(is_val)]
        dev = self._deviations(self._layer_arrays(val, names), np.asarray(val.logits).argmax(1))
        mean_dev = dev.mean(0)
        # a layer on which held-out ID samples never deviate weighs like one that deviates a little
        floor = max(float(mean_dev.max()) * 1e-3, 1e-12)
        self.layer_norms_ = np.maximum(mean_dev, floor)

    def _deviations(self, layers: list[np.ndarray], pred: np.ndarray) -> np.ndarray:
        """(n, n_layers) summed relative range deviations."""

        def one(sl: slice) -> np.ndarray:
            p = pred[sl]
            cols = []
            for i, g in enumerate(self._gram_features(layers, sl)):
                lo, hi, eps = self.mins_[i][p], self.maxs_[i][p], self.eps_[i]
                below = np.maximum(lo - g, 0.0) / (np.abs(lo) + eps)
                above = np.maximum(g - hi, 0.0) / (np.abs(hi) + eps)
                cols.append((below + above).sum(1))
            return np.stack(cols, axis=1)

        return map_chunks(one, len(pred), self.chunk_size)

    def _score(self, x: Features) -> np.ndarray:
        layers = self._layer_arrays(x, self.layer_names_)
        pred = np.asarray(x.logits).argmax(1)
        with np.errstate(over="ignore", invalid="ignore"):
            total = (self._deviations(layers, pred) / self.layer_norms_).sum(1)
        if not np.all(np.isfinite(total)):
            worst = max(float(np.max(np.abs(a))) / s for a, s in zip(layers, self.layer_scales_))
            raise ValueError(
                f"gram: {int(np.sum(~np.isfinite(total)))} samples have layer values up to "
                f"{worst:.1e} times the largest seen in training; their Gram deviations overflow "
                "float64. Such inputs are far out of distribution, or the features are in other "
                "units than the training features: extract both the same way."
            )
        return -total
