"""Detectors on penultimate features that compare a sample with stored ID references:
GROOD (nearest neighbours in the space of gradients w.r.t. an OOD prototype) and CF-OOD
(the Concentration-Free Outlier Factor, a reverse-nearest-neighbour score).

Both keep arrays only (prototypes, reference features, neighbour-distance tables), so they
persist as plain arrays; distances are squared Euclidean from float64 GEMMs in row blocks.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from .._numeric import array_key, l2_normalize, log_softmax, remember
from .._params import store_params
from ..features import Features
from ._checks import check_fraction, check_int
from .base import Detector, register

__all__ = ["GROOD", "CFOOD", "cfof_grid"]

#: Query rows per block when no (rows x references) array is built.
_QUERY_BLOCK = 1024
#: Elements of a (rows x references) float64 block (64 MiB).
_BLOCK_ELEMENTS = 1 << 23


def _blocks(n: int, n_ref: int):
    """Row slices of ``n`` queries such that a (rows, n_ref) float64 array stays ~64 MiB."""
    step = max(1, min(_QUERY_BLOCK, _BLOCK_ELEMENTS // max(n_ref, 1)))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances in float64, clipped at 0 (round-off).

    float64 on purpose: these distances are compared with stored thresholds (CF-OOD) or are
    tiny (GROOD's gradients of ID samples), where float32 round-off of the GEMM changed
    scores between a batch and its rows."""
    a = np.asarray(a, dtype=np.float64)
    d = np.einsum("ij,ij->i", a, a)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def _class_means(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(labels)
    means = np.stack([np.mean(features[labels == c], axis=0, dtype=np.float64) for c in classes])
    return classes, means


@register("grood")
class GROOD(Detector):
    """GROOD: gradient-aware OOD detection (ElAraby et al., TMLR 2025).

    Class prototypes ``μ_c`` are the class means of the ID training features; an OOD
    prototype ``μ_o`` is built from synthetic outliers. With the nearest-class-prototype
    logits ``s_j(h) = −‖h − μ_j‖`` over the classes and ``μ_o``, the gradient of the
    cross-entropy (target: the network's predicted class) w.r.t. ``μ_o`` is, in closed form,
    ``g(h) = q_o(h) · (h − μ_o) / ‖h − μ_o‖`` with ``q = softmax(s)``. ``fit`` stores ``g`` of
    the correctly classified training samples; the score is minus the distance from ``g(x)``
    to its ``k``-th nearest stored gradient (``k = 1`` as in the authors' code).

    OOD prototype (``ood_prototype``): ``"mixup"`` (default) averages synthetic outliers made
    by mixing each training feature with the prototype of its second most likely class,
    ``λ h + (1 − λ) μ_{c2}`` with ``λ = mix`` (0.5 in the authors' synthetic procedure). The
    authors mix at an intermediate layer and run the rest of the network; here the mix is at
    the penultimate layer, so cached features suffice. ``"mean"`` uses the mean of the class
    prototypes (their ``use_proto_mean`` option). Their validation-OOD prototype is not offered:
    ``fit`` sees ID data only.
    """

    requires = frozenset({"features", "logits"})
    fit_fields = frozenset({"features", "logits", "labels"})
    search_space: ClassVar[dict[str, list[Any]]] = {"k": [1, 10, 20, 50, 100], "ood_prototype": ["mixup", "mean"]}
    score_params = frozenset({"k"})
    transient_state = frozenset({"_knn_cache_", "_planned_ks_"})
    _CACHE_ENTRIES = 4
    reference = (
        "ElAraby et al., GROOD: Gradient-Aware Out-of-Distribution Detection, TMLR 2025 "
        "(arXiv:2312.14427)"
    )

    def __init__(self, k: int = 1, ood_prototype: str = "mixup", mix: float = 0.5):
        self.k = k
        self.ood_prototype = ood_prototype
        self.mix = mix

    def _check_params(self) -> None:
        check_int(self, "k", self.k)
        if self.ood_prototype not in ("mixup", "mean"):
            raise ValueError(f"GROOD: ood_prototype must be 'mixup' or 'mean', got {self.ood_prototype!r}.")
        check_fraction(self, "mix", self.mix, allow_one=False)

    def gradients(self, features: np.ndarray) -> np.ndarray:
        """(N, D) gradients of the prototype loss w.r.t. the OOD prototype, float64."""
        protos = np.vstack([self.prototypes_, self.ood_prototype_[None, :]])
        out = np.empty(features.shape, dtype=np.float64)
        for start in range(0, len(features), _QUERY_BLOCK):
            rows = slice(start, start + _QUERY_BLOCK)
            h = np.asarray(features[rows], dtype=np.float64)
            diff = h[:, None, :] - protos[None, :, :]
            dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
            q_ood = np.exp(log_softmax(-dist, axis=1)[:, -1])
            to_ood, norm = diff[:, -1, :], dist[:, -1:]
            unit = np.divide(to_ood, norm, out=np.zeros_like(to_ood), where=norm > 0)
            out[rows] = q_ood[:, None] * unit
        return out

    def _fit(self, train: Features) -> None:
        h = np.asarray(train.features, dtype=np.float64)
        classes, means = _class_means(h, train.labels)
        self.classes_ = classes
        self.prototypes_ = means
        logits = np.asarray(train.logits, dtype=np.float64)
        if self.ood_prototype == "mean":
            self.ood_prototype_ = means.mean(axis=0)
        else:
            # second most likely class among the classes that have a prototype
            known = np.full(logits.shape[1], -np.inf)
            known[classes[classes < logits.shape[1]]] = 0.0
            masked = logits + known
            second = np.argsort(masked, axis=1)[:, -2] if len(classes) > 1 else np.argmax(masked, axis=1)
            index = np.searchsorted(classes, second)
            mixed = float(self.mix) * h + (1.0 - float(self.mix)) * means[index]
            self.ood_prototype_ = mixed.mean(axis=0)
        correct = np.argmax(logits, axis=1) == train.labels
        if not correct.any():
            raise ValueError(
                "GROOD.fit: no training sample is classified correctly by the network, so there "
                "are no reference gradients; check that labels and logits belong together."
            )
        grads = self.gradients(h[correct])
        self.train_gradients_ = grads
        self.train_gradients_sq_ = np.einsum("ij,ij->i", grads, grads)
        # shared by shallow copies (the tuner's score-time candidates); emptied by a refit
        self._knn_cache_: dict[Any, dict[int, np.ndarray]] = {}
        self._planned_ks_: list[int] = []

    def plan_score_params(self, values: dict[str, list[Any]]) -> None:
        """Announce the ``k`` values about to be scored (the tuner calls this): the first
        score of a query set then finds the k-th nearest distance for all of them in one
        search."""
        self._planned_ks_[:] = [int(k) for k in values.get("k", ())
                                if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1]

    def _score(self, x: Features) -> np.ndarray:
        """Minus the distance to the k-th nearest stored gradient. Computed for every planned
        ``k`` in one search and kept for the last few query sets (keyed by their bytes), so
        tuning over ``k`` costs one search per validation split."""
        check_int(self, "k", self.k)
        k = int(self.k)
        feats = np.ascontiguousarray(x.features)
        key = array_key(feats)
        cache = self.__dict__.get("_knn_cache_")
        if cache is not None and key in cache and k in cache[key]:
            return cache[key][k].copy()
        ks = list(dict.fromkeys([k, *getattr(self, "_planned_ks_", ())]))
        out = {kk: np.empty(len(feats)) for kk in ks}
        n_ref = len(self.train_gradients_)
        # np.partition's k-th values do not depend on the other kth positions asked for
        kth = sorted({min(kk, n_ref) - 1 for kk in ks})
        for rows in _blocks(len(feats), n_ref):
            g = self.gradients(feats[rows])
            d = np.partition(_sq_dists(g, self.train_gradients_, self.train_gradients_sq_), kth, axis=1)
            for kk in ks:
                out[kk][rows] = -np.sqrt(d[:, min(kk, n_ref) - 1])
        if cache is not None:
            remember(cache, key, out, self._CACHE_ENTRIES)
        return out[k].copy()


def cfof_grid() -> np.ndarray:
    """Neighbourhood sizes (fractions of the reference set) at which CF-OOD evaluates the
    reverse-neighbour count: fine steps below 10%, coarser up to 99% (the OpenOOD grid)."""
    return np.concatenate([np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                           np.linspace(0.51, 0.99, 49)])


@register("cfood", "cf_ood", "cfof")
class CFOOD(Detector):
    """CF-OOD: the Concentration-Free Outlier Factor on L2-normalised features
    (Angiulli, Fassetti & Zupi; CFOF: Angiulli, TKDD 2020).

    ``CFOF(x)`` is the smallest neighbourhood size ``κ`` (a fraction of the reference set)
    such that ``x`` is among the ``κ·n`` nearest neighbours of at least ``ϱ·n`` reference points
    — a reverse-nearest-neighbour measure that does not suffer from distance concentration in
    high dimension. ``fit`` takes a random ``reference_fraction`` of the training features
    (L2-normalised) and stores, for every reference point, its distance to its ``κ·n``-th
    nearest other reference point for ``κ`` on the `cfof_grid`. ``x`` counts as one of point
    ``y``'s ``κ·n`` neighbours when ``‖x − y‖`` is at most that distance. Score ``−κ(x)``
    (``−1`` when no grid size reaches ``ϱ``).
    """

    requires = frozenset({"features"})
    fit_fields = frozenset({"features"})
    search_space: ClassVar[dict[str, list[Any]]] = {"reference_fraction": [0.1, 0.5, 1.0],
                                                    "rho": [0.001, 0.005, 0.01, 0.05]}
    score_params = frozenset({"rho"})
    min_fit_samples = 3
    transient_state = frozenset({"_cfof_cache_", "_planned_rhos_"})
    _CACHE_ENTRIES = 4
    reference = (
        "Angiulli, Fassetti & Zupi, CF-OOD: Concentration-Free Density Estimation for Reliable "
        "Out-of-Distribution Detection (2026); CFOF: Angiulli, ACM TKDD 14(1), 2020"
    )

    def __init__(self, rho: float = 0.01, reference_fraction: float = 0.1,
                 max_reference: int | None = 20000, random_state: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_fraction(self, "rho", self.rho)
        check_fraction(self, "reference_fraction", self.reference_fraction)
        if self.max_reference is not None:
            check_int(self, "max_reference", self.max_reference)

    @staticmethod
    def _reference_size(fraction: float, max_reference: int | None, n_all: int) -> int:
        n = max(2, int(float(fraction) * n_all))
        if max_reference is not None:
            n = min(n, int(max_reference))
        return min(n, n_all)

    def equivalent_fit_params(self, params: dict[str, Any], n_train: int | None) -> dict[str, Any]:
        """Reference fractions that select the same number of rows (e.g. 0.5 and 1.0 of
        55,000 rows, both capped at ``max_reference``) fit the same reference set."""
        if n_train is None or "reference_fraction" not in params:
            return params
        try:
            n = self._reference_size(params["reference_fraction"],
                                     params.get("max_reference", self.max_reference), n_train)
        except (TypeError, ValueError):
            return params
        return {**params, "reference_fraction": f"{n} reference rows"}

    def _fit(self, train: Features) -> None:
        n_all = len(train)
        n = self._reference_size(self.reference_fraction, self.max_reference, n_all)
        rows = np.sort(np.random.default_rng(self.random_state).permutation(n_all)[:n])
        ref = l2_normalize(np.asarray(train.features[rows], dtype=np.float64), axis=1)
        grid = cfof_grid()
        pos = (grid * n - 1).astype(int)  # 0 = nearest other point
        keep = (pos >= 0) & (pos + 1 <= n - 1)
        pos, grid = pos[keep], grid[keep]
        distinct = np.concatenate([[True], pos[1:] > pos[:-1]])
        pos, grid = pos[distinct], grid[distinct]
        if len(pos) == 0:
            raise ValueError(f"CFOOD.fit: {n} reference points are too few for any neighbourhood size.")
        ref_sq = np.einsum("ij,ij->i", ref, ref)
        table = np.empty((n, len(pos)), dtype=np.float64)
        for block in _blocks(n, n):
            d = _sq_dists(ref[block], ref, ref_sq)
            d[np.arange(d.shape[0]), np.arange(block.start, block.stop)] = -1.0  # self first
            table[block] = np.sort(d, axis=1)[:, pos + 1]
        self.reference_ = ref
        self.reference_sq_ = ref_sq
        self.grid_ = grid
        self.neighbour_distances_ = table
        # shared by shallow copies (the tuner's score-time candidates); emptied by a refit
        self._cfof_cache_: dict[Any, dict[int, np.ndarray]] = {}
        self._planned_rhos_: list[float] = []

    def plan_score_params(self, values: dict[str, list[Any]]) -> None:
        """Announce the ``rho`` values about to be scored (the tuner calls this): the first
        score of a query set then computes the CFOF for all of them in one pass."""
        self._planned_rhos_[:] = [float(r) for r in values.get("rho", ())
                                  if isinstance(r, (int, float)) and 0 < r <= 1]

    def _need(self, rho: float) -> int:
        return max(1, math.ceil(float(rho) * len(self.neighbour_distances_) - 1e-9))

    def cfof(self, x: Features) -> np.ndarray:
        """CFOF values ``κ(x)`` in (0, 1]. Computed for every planned ``rho`` at once and
        kept for the last few query sets (keyed by their bytes), so tuning over ``rho``
        costs one pass per validation split."""
        check_fraction(self, "rho", self.rho)
        need = self._need(self.rho)
        feats = np.ascontiguousarray(x.features)
        key = array_key(feats)
        cache = self.__dict__.get("_cfof_cache_")
        if cache is not None and key in cache and need in cache[key]:
            return cache[key][need].copy()
        needs = list(dict.fromkeys([need, *(self._need(r) for r in getattr(self, "_planned_rhos_", ()))]))
        out = self._cfof(feats, needs)
        if cache is not None:
            remember(cache, key, out, self._CACHE_ENTRIES)
        return out[need].copy()

    def _cfof(self, feats: np.ndarray, needs: list[int]) -> dict[int, np.ndarray]:
        table = self.neighbour_distances_
        n, k = table.shape
        out = {need: np.empty(len(feats)) for need in needs}
        for rows in _blocks(len(feats), n):
            q = l2_normalize(np.asarray(feats[rows], dtype=np.float64), axis=1)
            d = np.ascontiguousarray(_sq_dists(q, self.reference_, self.reference_sq_).T)  # (n, rows)
            r = d.shape[1]
            # first grid index whose neighbour distance reaches d (k = never): each
            # reference point's row of the table is ascending, so a binary search per row
            first_all = np.empty(d.shape, dtype=np.int32)
            for j in range(n):
                first_all[j] = np.searchsorted(table[j], d[j], side="left")
            # per query, how many references have each first index; the need-th smallest
            # first index is the smallest g whose cumulative count reaches need
            first_all += (np.arange(r, dtype=np.int32) * (k + 1))[None, :]
            counts = np.bincount(first_all.ravel(), minlength=r * (k + 1)).reshape(r, k + 1)
            cumulative = np.cumsum(counts, axis=1)
            for need in needs:
                first = np.count_nonzero(cumulative < need, axis=1)
                out[need][rows] = np.where(first < k, self.grid_[np.minimum(first, k - 1)], 1.0)
        return out

    def _score(self, x: Features) -> np.ndarray:
        return -self.cfof(x)
