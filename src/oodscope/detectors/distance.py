"""Distance-based detectors on penultimate features: Gaussian (Mahalanobis family),
nearest-neighbour, principal-subspace residual and decision-boundary scores.

Fits of the Gaussian and subspace detectors stream over ``train.features`` in chunks
(`oodscope.detectors._stats`), so a memory-mapped float16 ImageNet bank never becomes a full
float64 copy; scoring is chunked too and done with float32 GEMMs.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable

import numpy as np

from .._params import store_params
from .._state import persistable
from .._numeric import (
    array_key,
    l2_normalize,
    logsumexp,
    remember,
    shrunk_covariance_inverse,
    single_threaded_blas,
    softmax,
)
from ..features import Features
from ._checks import check_positive_int as _check_positive_int
from ._neighbors import probe_recall, release_rows, stream_topk, topk_inner_products
from ._stats import (
    GaussianScorer,
    ScatterAccumulator,
    _group_sums,
    iter_chunks,
    map_chunks,
    progress,
)
from .base import Detector, register

__all__ = [
    "Mahalanobis",
    "RelativeMahalanobis",
    "SSD",
    "KNN",
    "ViM",
    "Residual",
    "NNGuide",
    "SHE",
    "Relation",
    "FDBD",
    "knn_recall_at_k",
    "vim_default_dim",
    "AUTO_APPROXIMATE_ABOVE",
]

_SHRINKAGE_SPACE = [1e-4, 1e-3, 1e-2, 1e-1]


# ---------------------------------------------------------------------- helpers
def _check_shrinkage(shrinkage: Any) -> None:
    if not (isinstance(shrinkage, (int, float)) and 0.0 <= shrinkage < 1.0):
        raise ValueError(f"shrinkage must be a float in [0, 1), got {shrinkage!r}.")


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and not (
        isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1
    ):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}.")


def _num_classes(train: Features) -> int:
    c = train.num_classes
    return int(c) if c is not None else int(train.labels.max()) + 1


def _accumulate(
    features: np.ndarray,
    groups: np.ndarray | None,
    num_groups: int,
    chunk_size: int | None,
    desc: str,
    transform=None,
    reference: np.ndarray | None = None,
) -> ScatterAccumulator:
    acc = ScatterAccumulator(features.shape[1], num_groups, reference=reference)
    chunks = list(iter_chunks(len(features), chunk_size))
    for sl in progress(chunks, len(chunks), desc):
        x = np.array(features[sl])
        release_rows(features, sl)  # a memory-mapped bank does not stay resident
        if transform is not None:
            x = transform(np.asarray(x, dtype=np.float64))
        acc.update(x, None if groups is None else groups[sl])
    return acc


def _logits(f: Features, sl: slice = slice(None)) -> np.ndarray:
    """Logits of a chunk: the stored ones, else recomputed from features with the head."""
    if f.logits is not None:
        return np.asarray(f.logits[sl])
    return f.logits_from_features(np.asarray(f.features[sl], dtype=np.float32))


def _subsample_indices(n: int, subsample: float | int | None, seed: int) -> np.ndarray | None:
    if subsample is None:
        return None
    if isinstance(subsample, (float, np.floating)):
        count = int(round(subsample * n))
    else:
        count = int(subsample)
    count = max(1, min(count, n))
    if count == n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False))


def _check_subsample(subsample: Any) -> None:
    if subsample is None:
        return
    if isinstance(subsample, bool):
        raise ValueError(
            f"subsample must be None, a fraction in (0, 1] or a count >= 1, got {subsample!r}."
        )
    if isinstance(subsample, (float, np.floating)):
        if not 0.0 < subsample <= 1.0:
            raise ValueError(f"subsample as a fraction must be in (0, 1], got {subsample}.")
    elif isinstance(subsample, (int, np.integer)):
        if subsample < 1:
            raise ValueError(f"subsample as a count must be >= 1, got {subsample}.")
    else:
        raise ValueError(
            f"subsample must be None, a fraction in (0, 1] or a count >= 1, got {subsample!r}."
        )


def _unit32(rows: np.ndarray) -> np.ndarray:
    """Row-L2-normalised float32 rows. float64 input is normalised in float64 before the
    cast, so features in any units (1e-30 or 1e30) give the same unit vectors."""
    return l2_normalize(np.asarray(rows), axis=1, dtype=np.float32)


def _normalized32(features: np.ndarray, chunk_size: int | None = None) -> np.ndarray:
    """Row-L2-normalised float32 copy, built chunk by chunk (input may be float16 memmap)."""
    out = np.empty(features.shape, dtype=np.float32)
    for sl in iter_chunks(len(features), chunk_size):
        out[sl] = _unit32(features[sl])
        release_rows(features, sl)
    return out


# ------------------------------------------------------------- Gaussian family
class _SharedGaussian(Detector):
    """Class means plus one covariance shared by all classes, fitted in one streaming pass."""

    requires = frozenset({"features"})
    fit_fields = frozenset({"features", "labels"})
    search_space = {"shrinkage": _SHRINKAGE_SPACE}

    def __init__(self, shrinkage: float = 1e-3, chunk_size: int | None = None):
        self.shrinkage = shrinkage
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        _check_shrinkage(self.shrinkage)
        _check_chunk_size(self.chunk_size)

    #: GEMM precision of scoring; float64 where the score is a difference of distances.
    _score_dtype: type = np.float32

    def _fit_class_gaussians(self, train: Features) -> ScatterAccumulator:
        acc = _accumulate(
            train.features, train.labels, _num_classes(train), self.chunk_size, f"{self.name} fit"
        )
        self.classes_ = acc.present()
        self.means_ = acc.means()[self.classes_]
        # Lee et al. (and sklearn's EmpiricalCovariance on class-centred features) divide the
        # within-class scatter by N, the total number of training samples.
        self.covariance_ = acc.within_scatter() / acc.total
        self.precision_ = shrunk_covariance_inverse(self.covariance_, self.shrinkage)
        self.center_ = acc.grand_mean()
        self._classes_scorer_ = GaussianScorer(
            self.means_, self.precision_, center=self.center_, dtype=self._score_dtype
        )
        return acc

    def class_distances(self, x: Features) -> np.ndarray:
        """(n, n_classes) squared Mahalanobis distances to the class means (fitted classes)."""
        return self._classes_scorer_.sq_distances(x.features, self.chunk_size)


@register("mahalanobis", "mds")
class Mahalanobis(_SharedGaussian):
    """Mahalanobis distance to the closest class mean (Lee et al., NeurIPS 2018).

    Class-conditional Gaussians with a shared covariance: ``μ_c`` are the class means and
    ``Σ = (1/N) Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ`` — the within-class scatter divided by
    **N, the total number of training samples** (not by the number of classes, which one
    library used, and not N − C). ``Σ`` is inverted with scale-relative shrinkage.
    Score: ``−min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c)``. Features only: no input perturbation and no
    layer ensemble.
    """

    reference = (
        "Lee et al., A Simple Unified Framework for Detecting Out-of-Distribution "
        "Samples and Adversarial Attacks, NeurIPS 2018"
    )

    def _fit(self, train: Features) -> None:
        self._fit_class_gaussians(train)

    def _score(self, x: Features) -> np.ndarray:
        return -self.class_distances(x).min(axis=1)


@register("rmds", "relative_mahalanobis")
class RelativeMahalanobis(_SharedGaussian):
    """Relative Mahalanobis distance (Ren et al., 2021).

    ``RMD_c(x) = MD_c(x) − MD_0(x)`` where ``MD_c`` uses the class means and shared
    covariance of `Mahalanobis` and ``MD_0`` a single Gaussian fitted to all training data
    (global mean and covariance, divided by N). Score ``−min_c RMD_c(x) = MD_0(x) − min_c
    MD_c(x)``: large background distance but close to a class = in-distribution.
    Needs at least two classes (with one class the score is identically zero).
    """

    _score_dtype = np.float64  # MD_0 − MD_c cancels: float32 GEMMs would lose ~3 digits
    reference = (
        "Ren et al., A Simple Fix to Mahalanobis Distance for Improving Near-OOD "
        "Detection, arXiv:2106.09022, 2021"
    )

    def _fit(self, train: Features) -> None:
        acc = self._fit_class_gaussians(train)
        if len(self.classes_) < 2:
            raise ValueError(
                "rmds needs training samples from at least two classes (the relative distance "
                "to a single class is always zero); use 'mahalanobis' or 'ssd' instead."
            )
        self.background_mean_ = acc.grand_mean()
        self.background_covariance_ = acc.total_scatter() / acc.total
        self.background_precision_ = shrunk_covariance_inverse(
            self.background_covariance_, self.shrinkage
        )
        self._background_scorer_ = GaussianScorer(
            self.background_mean_[None],
            self.background_precision_,
            center=self.background_mean_,
            dtype=np.float64,
        )

    def _score(self, x: Features) -> np.ndarray:
        md0 = self._background_scorer_.sq_distances(x.features, self.chunk_size)[:, 0]
        return md0 - self.class_distances(x).min(axis=1)


@register("ssd", "onecls_mahalanobis", "palm_score")
class SSD(Detector):
    """One-class Mahalanobis on L2-normalised, standardised features (SSD / PALM test score).

    Features are L2-normalised, then standardised with the training mean and standard
    deviation per dimension (``z = (x̂ − m)/s``); a single Gaussian is fitted to ``z`` and
    ``S(x) = −(z − μ)ᵀ Σ⁺ (z − μ)`` (``μ = 0`` after standardisation). This is the
    unsupervised SSD score with one cluster (Sehwag et al., ICLR 2021) and the test score of
    PALM (Lu et al., ICLR 2024). Dimensions that are constant in training keep std 1.
    """

    requires = frozenset({"features"})
    fit_fields = frozenset({"features"})
    search_space = {"shrinkage": _SHRINKAGE_SPACE}
    reference = (
        "Sehwag et al., SSD: A Unified Framework for Self-Supervised Outlier Detection, "
        "ICLR 2021; Lu et al., Learning with Mixture of Prototypes for OOD Detection (PALM), "
        "ICLR 2024"
    )

    def __init__(self, shrinkage: float = 1e-3, chunk_size: int | None = None):
        self.shrinkage = shrinkage
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        _check_shrinkage(self.shrinkage)
        _check_chunk_size(self.chunk_size)

    def _fit(self, train: Features) -> None:
        acc = _accumulate(
            train.features,
            None,
            1,
            self.chunk_size,
            "ssd fit",
            transform=lambda x: l2_normalize(x, axis=1),
        )
        self.mean_ = acc.grand_mean()
        cov = acc.within_scatter() / acc.total
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        self.std_ = np.where(std > 1e-12 * max(std.max(), 1e-300), std, 1.0)
        self.covariance_ = cov / np.outer(self.std_, self.std_)  # covariance of z
        self.precision_ = shrunk_covariance_inverse(self.covariance_, self.shrinkage)
        # the same quadratic form expressed on x̂ directly: Σ_x̂⁻¹ = D⁻¹ Σ_z⁻¹ D⁻¹
        precision_x = self.precision_ / np.outer(self.std_, self.std_)
        self._scorer_ = GaussianScorer(self.mean_[None], precision_x, center=self.mean_)

    def _score(self, x: Features) -> np.ndarray:
        feats = x.features
        out = np.empty(len(x))
        for sl in iter_chunks(len(x), self.chunk_size):
            xn = _unit32(feats[sl])
            out[sl] = -self._scorer_.sq_distances(xn, self.chunk_size)[:, 0]
        return out


# ------------------------------------------------------------ nearest neighbours
def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


#: ``index`` values of the detectors with a neighbour bank (``"flat"`` = ``"exact"``).
_INDEX_CHOICES = ("auto", "exact", "flat", "ivf", "ivfpq", "hnsw")
#: What an index object can be.
_INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
#: How ivf / hnsw store the bank vectors: 4, 2 or 1 byte per value (faiss scalar quantiser;
#: int8 uses a per-dimension range learnt from the bank). Recall is measured all the same.
_STORAGES = ("float32", "float16", "int8")
#: ``index="auto"``: exact search for banks up to this many rows; above, an IVF index whose
#: ``nprobe`` is calibrated to the recall target (kept only if it searches faster than exact).
AUTO_APPROXIMATE_ABOVE = 200_000
#: The recall calibration of an HNSW index does not raise efSearch above this.
_MAX_EF_SEARCH = 4096
_HNSW_EF_CONSTRUCTION = 64


def _default_nlist(n: int) -> int:
    """√n cells (faiss warns below 39 training points per cell): balances the coarse search
    (nlist centroids) against the scan of the probed cells (√n vectors each)."""
    return int(max(1, min(round(math.sqrt(n)), n // 39)))


def _default_pq_m(d: int) -> int:
    for sub in (8, 4, 2, 1):
        if d % sub == 0 and d // sub >= 1:
            return d // sub
    return d


def _faiss_or_none(backend: str, kind: str):
    faiss = _import_faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ValueError(
            "backend='faiss' but faiss is not importable; pip install faiss-cpu "
            "or use backend='auto'/'numpy'."
        )
    if kind != "flat" and faiss is None:
        raise ValueError(
            f"index={kind!r} needs faiss (pip install faiss-cpu); "
            "use index='exact' for the exact numpy search."
        )
    return faiss


@persistable
class _InnerProductIndex:
    """Top-k inner-product search over a float32 bank: faiss when available, else numpy.

    ``rows(idx)`` returns float32 bank rows for a slice or index array, so faiss indexes are
    filled chunk by chunk from (possibly memory-mapped float16) features without a second
    full copy; only the numpy backend materialises the bank. ``kind="flat"`` is exact;
    ``"ivf"`` (``nlist`` cells, ``nprobe`` visited per query), ``"ivfpq"`` (plus ``pq_m``
    sub-quantisers) and ``"hnsw"`` (``hnsw_m`` links per node, ``ef_search`` candidates
    per query) are faiss approximate indexes; ``storage="float16"`` / ``"int8"`` keeps the
    vectors of ivf/hnsw in 2 / 1 bytes per value (faiss scalar quantiser: a half / a quarter
    of the memory, inner products within ~1e-4 / ~1e-2 of float32).

    ``recall`` (a dict: ``k``, ``target``, ``probe_size``, ``seed``; approximate kinds
    only) measures recall@k on a held-out probe of the bank while the index is built and
    raises ``nprobe`` / ``ef_search`` to the target (see `_calibrate`); the outcome stays
    in ``calibration``.
    """

    def __init__(
        self,
        rows: Callable[[Any], np.ndarray],
        n: int,
        d: int,
        kind: str = "flat",
        backend: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        pq_m: int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
        storage: str = "float32",
        hnsw_m: int = 32,
        ef_search: int | None = None,
        recall: dict[str, Any] | None = None,
    ):
        self.kind = kind
        self.size = int(n)
        self.storage = storage
        self.calibration: dict[str, Any] | None = None
        self.order: np.ndarray | None = None  # insertion position -> bank row (None: same)
        faiss = _faiss_or_none(backend, kind)
        self.bank = None
        self.index = None
        if faiss is None:
            self.bank = np.empty((n, d), dtype=np.float32)
            for sl in iter_chunks(n, chunk_size):
                self.bank[sl] = rows(sl)
            return
        index = self._new_faiss_index(faiss, rows, n, d, nlist, nprobe, pq_m, seed, storage,
                                      hnsw_m)
        probe = None
        if recall is not None and kind != "flat":
            # at most a tenth of the bank, so the held-out index stays representative
            m = min(int(recall["probe_size"]), n // 10)
            if m >= 1:
                rng = np.random.default_rng(int(recall["seed"]) + 1)
                probe = np.sort(rng.choice(n, m, replace=False))
        # the probe rows go in last, after the calibration searched the index without them
        keep = None
        if probe is not None:
            keep = np.ones(n, dtype=bool)
            keep[probe] = False
            self.order = np.concatenate([np.flatnonzero(keep), probe])
        chunks = list(iter_chunks(n, chunk_size))
        cells = self._reserve_cells(index, rows, chunks) if kind in ("ivf", "ivfpq") else None
        for sl in progress(chunks, len(chunks), "index"):
            block = rows(sl)
            part = None if cells is None else cells[sl]
            if keep is not None and not keep[sl].all():
                block = block[keep[sl]]
                part = None if part is None else part[keep[sl]]
            self._add(faiss, index, block, part)
        if kind == "hnsw":
            index.hnsw.efSearch = int(ef_search) if ef_search is not None else 64
        self.index = index
        if probe is not None:
            fixed = (nprobe if kind != "hnsw" else ef_search) is not None
            self._calibrate(rows, recall["k"], None if fixed else recall["target"], probe,
                            int(recall["seed"]), held_out=True)
            self._add(faiss, index, rows(probe), None if cells is None else cells[probe])
        if kind == "ivf":
            index.make_direct_map()  # exact rows back, to re-measure recall for a larger k

    @staticmethod
    def _reserve_cells(index, rows: Callable[[Any], np.ndarray], chunks: list[slice]) -> np.ndarray:
        """The cell of every bank row, and each inverted list allocated at its final size:
        lists grown row by row double their capacity, up to twice the memory of the codes
        (7.8 GB instead of 5 for a float16 ImageNet bank)."""
        import faiss

        cells = np.empty(chunks[-1].stop, dtype=np.int64)
        for sl in progress(chunks, len(chunks), "assign"):
            cells[sl] = index.quantizer.search(np.ascontiguousarray(rows(sl)), 1)[1][:, 0]
        lists = faiss.downcast_InvertedLists(index.invlists)
        counts = np.bincount(cells, minlength=index.nlist)
        for cell in np.flatnonzero(counts):
            lists.resize(int(cell), int(counts[cell]))  # allocate ...
            lists.resize(int(cell), 0)  # ... and empty: the capacity stays
        return cells

    def _add(self, faiss, index, block: np.ndarray, cells: np.ndarray | None = None) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if cells is not None:  # IVF: the cells are known, add without assigning again
            cells = np.ascontiguousarray(cells, dtype=np.int64)
            index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(cells))
            return
        # an HNSW graph built by several threads depends on their timing: build it on one
        threads = faiss.omp_get_max_threads()
        if self.kind == "hnsw":
            faiss.omp_set_num_threads(1)
        try:
            index.add(block)
        finally:
            faiss.omp_set_num_threads(threads)

    def _new_faiss_index(self, faiss, rows, n, d, nlist, nprobe, pq_m, seed, storage, hnsw_m):
        qtype = {"float16": faiss.ScalarQuantizer.QT_fp16,
                 "int8": faiss.ScalarQuantizer.QT_8bit}.get(storage)
        ip = faiss.METRIC_INNER_PRODUCT
        rng = np.random.default_rng(seed)
        if self.kind == "flat":
            return faiss.IndexFlatIP(d)
        if self.kind == "hnsw":
            index = (faiss.IndexHNSWSQ(d, qtype, int(hnsw_m), ip) if qtype is not None
                     else faiss.IndexHNSWFlat(d, int(hnsw_m), ip))
            index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
            if not index.is_trained:  # the int8 ranges
                n_train = min(n, 65_536)
                ids = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
                index.train(np.ascontiguousarray(rows(ids)))
            return index
        nlist = _default_nlist(n) if nlist is None else int(nlist)
        if nlist > n:
            raise ValueError(f"nlist={nlist} exceeds the {n} bank vectors; lower nlist.")
        quantizer = faiss.IndexFlatIP(d)
        if self.kind == "ivf":
            index = (faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qtype, ip)
                     if qtype is not None else faiss.IndexIVFFlat(quantizer, d, nlist, ip))
        else:
            m = _default_pq_m(d) if pq_m is None else int(pq_m)
            if d % m:
                raise ValueError(f"pq_m={m} must divide the feature width {d}.")
            if n < 256:
                raise ValueError(
                    f"index='ivfpq' needs at least 256 bank vectors, got {n}; "
                    "use index='exact' or 'ivf'."
                )
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, ip)
        # 64 training points per cell (faiss asks for 39 to 256) and 10 k-means rounds:
        # fitting the cells of a 1.28M-row bank must not cost more than filling them
        n_train = min(n, max(64 * nlist, 10_000))
        sample_ids = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
        index.cp.seed = int(seed)
        index.cp.niter = 10
        index.train(np.ascontiguousarray(rows(sample_ids)))
        index.nprobe = (
            int(max(1, math.ceil(nlist / 16))) if nprobe is None else int(min(nprobe, nlist))
        )
        return index

    _CACHE_ENTRIES = 4

    # ------------------------------------------------------------ search breadth
    @property
    def knob_name(self) -> str | None:
        """The search-breadth parameter of an approximate index (``None`` when exact)."""
        return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}.get(self.kind)

    @property
    def knob(self) -> int | None:
        if self.kind == "hnsw":
            return int(self.index.hnsw.efSearch)
        if self.kind in ("ivf", "ivfpq"):
            return int(self.index.nprobe)
        return None

    @knob.setter
    def knob(self, value: int) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)
        else:
            self.index.nprobe = int(value)

    def _knob_range(self, k: int) -> tuple[int, int]:
        if self.kind == "hnsw":
            low = max(16, k)
            return low, max(low, min(_MAX_EF_SEARCH, self.size))
        return 1, int(self.index.nlist)

    def _internal(self, ids: np.ndarray) -> np.ndarray:
        """Insertion positions of bank rows ``ids``."""
        if self.order is None:
            return ids
        inverse = self.__dict__.get("_inverse")
        if inverse is None:
            inverse = self.__dict__["_inverse"] = np.argsort(self.order)
        return inverse[ids]

    def rows(self, idx: Any) -> np.ndarray:
        """Stored bank rows (float32) for a slice or an index array (flat, ivf, hnsw; the
        float16 storage gives them rounded to half precision)."""
        if self.index is None:
            return self.bank[idx]
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(self.size)
            if self.order is None:
                return self.index.reconstruct_n(start, stop - start)
            idx = np.arange(start, stop)
        internal = self._internal(np.asarray(idx, dtype=np.int64))
        return self.index.reconstruct_batch(np.ascontiguousarray(internal))

    # ------------------------------------------------------------ recall
    def _calibrate(self, rows: Callable[[Any], np.ndarray], k: int, target: float | None,
                   probe: np.ndarray, seed: int, held_out: bool) -> dict[str, Any]:
        """Measure recall@k of the probe rows ``probe`` and, when ``target`` is set, raise
        the search breadth (doubling ``nprobe`` / ``ef_search`` from its smallest useful
        value) until recall@k reaches it or the breadth its maximum.

        The probe rows are left out of the bank on both sides: the exact reference (a
        streamed exact search over ``rows``) skips them, and the index either does not
        hold them yet (``held_out``: the fit adds them after calibrating, so they are
        queries it has never seen) or filters them out of its results (a later
        re-measurement for a larger k). Recorded in ``calibration``: k, recall, target,
        probe size, breadth, and the seconds the probe took with exact and approximate
        search.
        """
        n = self.size
        k_eff = max(1, min(int(k), n - len(probe)))
        queries = np.ascontiguousarray(rows(probe), dtype=np.float32)
        exact_vals, exact_ids, exact_s = stream_topk(rows, n, queries, k_eff, exclude=probe)
        params = {}
        if not held_out:
            faiss = _import_faiss()
            selector = faiss.IDSelectorBatch(self._internal(probe).astype(np.int64))
            params["sel"] = faiss.IDSelectorNot(selector)
        low, high = self._knob_range(k_eff)
        value = self.knob if target is None else low
        while True:
            self.knob = value
            t0 = time.perf_counter()
            approx_ids = self._faiss_search(queries, k_eff, params)[1]
            search_s = time.perf_counter() - t0
            recall = probe_recall(queries, exact_vals, exact_ids, approx_ids, rows)
            if target is None or recall >= target or value >= high:
                break
            value = min(2 * value, high)
        self.calibration = {
            "k": int(k), "recall": float(recall), "target": target, "probe": int(len(probe)),
            "knob": self.knob_name, "value": int(value), "exact_s": float(exact_s),
            "search_s": float(search_s), "probe_ids": probe, "seed": int(seed),
            "held_out": bool(held_out),
        }
        self.__dict__.pop("_cache", None)
        return self.calibration

    def ensure_recall(self, k: int) -> None:
        """Re-measure (and re-calibrate) for ``k`` larger than the calibrated one, with the
        stored rows as the exact reference and the probe rows filtered out of the results
        (for HNSW the probe rows now sit in the graph, which flatters the estimate
        slightly). IVF-PQ and int8 storage keep no exact rows: they warn instead."""
        cal = self.calibration
        if cal is None or k <= cal["k"]:
            return
        if self.kind == "ivfpq" or self.storage == "int8":
            import warnings

            warnings.warn(
                f"{self.kind} ({self.storage}) recall was measured for k={cal['k']}, not k={k} "
                "(the index keeps no exact vectors to re-measure it); refit with this k to "
                "calibrate it.", RuntimeWarning, stacklevel=3,
            )
            cal["k"] = int(k)  # warn once per k
            return
        self._calibrate(self.rows, k, cal["target"], np.asarray(cal["probe_ids"]),
                        int(cal["seed"]), held_out=False)

    # ------------------------------------------------------------ persistence
    def get_state(self) -> dict[str, Any]:
        """Arrays only (see `oodscope.persistence`): an exact index keeps its vectors and is
        rebuilt on load; an approximate faiss index keeps its trained cells / graph through
        faiss's own binary format, held as a uint8 array (no pickle), so loading gives the
        very same index and scores."""
        state: dict[str, Any] = {"kind": self.kind, "size": self.size, "storage": self.storage}
        if self.calibration is not None:
            state["calibration"] = dict(self.calibration)
        if self.order is not None:
            state["order"] = self.order
        if self.index is None:
            state["bank"] = self.bank
        elif self.kind == "flat":
            state["vectors"] = self.index.reconstruct_n(0, self.index.ntotal)
        else:
            faiss = _import_faiss()
            state["faiss_index"] = np.asarray(faiss.serialize_index(self.index), dtype=np.uint8)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_InnerProductIndex":
        self = cls.__new__(cls)
        self.kind, self.size = str(state["kind"]), int(state["size"])
        self.storage = str(state.get("storage", "float32"))
        self.bank, self.index = None, None
        if self.kind not in _INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}")
        cal = state.get("calibration")
        self.calibration = dict(cal) if cal is not None else None
        order = state.get("order")
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        if self.order is not None and not np.array_equal(np.sort(self.order),
                                                         np.arange(self.size)):
            raise ValueError("index order must be a permutation of the bank rows")
        if "bank" in state:
            self.bank = np.asarray(state["bank"], dtype=np.float32)
            stored = len(self.bank)
        else:
            faiss = _import_faiss()
            if faiss is None:
                raise ValueError("this detector was saved with a faiss index; pip install faiss-cpu")
            if "vectors" in state:
                vectors = np.ascontiguousarray(state["vectors"], dtype=np.float32)
                if vectors.ndim != 2:
                    raise ValueError("index vectors must be a 2-D array")
                self.index = faiss.IndexFlatIP(vectors.shape[1])
                self.index.add(vectors)
            else:
                blob = np.asarray(state["faiss_index"])
                if blob.dtype != np.uint8 or blob.ndim != 1:
                    raise ValueError("faiss_index must be a 1-D uint8 array")
                try:
                    self.index = faiss.deserialize_index(blob)
                except RuntimeError as exc:
                    raise ValueError(f"unreadable faiss index: {exc}") from None
            stored = self.index.ntotal
        if stored != self.size:
            raise ValueError(f"the index holds {stored} vectors, the state says {self.size}")
        if self.calibration is not None and self.knob_name is not None:
            self.knob = int(self.calibration["value"])
        return self

    def _faiss_search(self, queries: np.ndarray, k: int, params: dict | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """faiss search, ids mapped back to bank rows; −inf / −1 for missing neighbours."""
        if params:
            faiss = _import_faiss()
            cls = faiss.SearchParametersHNSW if self.kind == "hnsw" else faiss.SearchParametersIVF
            extra = {"efSearch": self.knob} if self.kind == "hnsw" else {"nprobe": self.knob}
            vals, ids = self.index.search(queries, k, params=cls(**params, **extra))
        else:
            vals, ids = self.index.search(queries, k)
        if self.order is not None:
            ids = np.where(ids >= 0, self.order[np.maximum(ids, 0)], -1)
        return np.where(ids < 0, -np.inf, vals), ids

    def search(
        self, queries: np.ndarray, k: int, chunk_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(values, ids) of the k largest inner products per query, values descending.
        Missing neighbours (approximate index, too few probed) get value −inf and id −1.

        The last few results are kept, keyed by the queries' bytes and the search breadth:
        asking again for the same queries with the same or a smaller k slices the stored
        result instead of searching again. Hyperparameter tuning over k (largest k first)
        thus costs one search per validation split.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        key = ("queries", array_key(queries))
        return self._cached(key, k, lambda: self._search_block(queries, k, chunk_size))

    def search_rows(
        self, features: np.ndarray, rows: Callable[[slice], np.ndarray], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` for the queries ``rows(slice)`` built from ``features`` a chunk at a
        time (`SEARCH_CHUNK_ROWS`), so no full float32 copy of a large query set is held;
        cached like `search`, keyed by the bytes of ``features``.

        Each query's result is the one an unchunked search gives, bit for bit: the chunks
        are whole multiples of the query blocks of numpy's exact search and of faiss's
        coarse (IVF) search, and a short tail joins the chunk before it. faiss's exact
        (flat) search is not chunked: its round-off depends on the number of queries.
        """
        n = len(features)
        key = ("rows", features.shape, str(features.dtype), _digest_rows(features))

        def run() -> tuple[np.ndarray, np.ndarray]:
            parts = [self._search_block(rows(sl), k) for sl in self._query_chunks(n)]
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

        return self._cached(key, k, run)

    def _query_chunks(self, n: int) -> list[slice]:
        # whole multiples of the query blocks of the exact searches (faiss's flat search and
        # IVF's coarse search, or topk_inner_products), whose GEMMs then see the same rows
        if self.index is None:
            block = max(1, min(4096, (1 << 25) // max(self.size, 1)))
        elif self.kind == "flat":
            # faiss's exact search rounds differently for other query counts (~1e-7 of the
            # inner products, measured): searched whole, its float32 bank dwarfs the queries
            return [slice(0, n)]
        else:
            block = int(_import_faiss().cvar.distance_compute_blas_query_bs)
        step = block * max(1, -(-SEARCH_CHUNK_ROWS // block))
        chunks = list(iter_chunks(n, step))
        if len(chunks) > 1 and chunks[-1].stop - chunks[-1].start < _MIN_TAIL_ROWS:
            chunks[-2:] = [slice(chunks[-2].start, n)]
        return chunks

    def _search_block(self, queries: np.ndarray, k: int, chunk_size: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is not None:
            return self._faiss_search(queries, k)
        return topk_inner_products(self.bank, queries, k, chunk_size)

    def _cached(self, key: tuple, k: int, run: Callable[[], tuple[np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_cache", {})
        key = (*key, self.knob)
        hit = cache.get(key)
        if hit is not None and hit[0].shape[1] >= k:
            return hit[0][:, :k], hit[1][:, :k]
        vals, ids = run()
        cache.pop(key, None)
        cache[key] = (vals, ids)
        while len(cache) > self._CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        return vals, ids


#: Queries searched at once when scoring (`_InnerProductIndex.search_rows`): 8,192 x 2048
#: float32 = 64 MiB, instead of a float32 copy of the whole test set (400 MB for 50,000).
SEARCH_CHUNK_ROWS = 8192
#: A last query chunk shorter than this joins the one before it (see `search_rows`).
_MIN_TAIL_ROWS = 64


def _digest_rows(features: np.ndarray) -> str:
    """A digest of a (possibly memory-mapped) array's bytes, read chunk by chunk with the
    pages released (`array_key` would read the whole array at once)."""
    h = hashlib.blake2b(digest_size=16)
    for sl in iter_chunks(len(features)):
        h.update(np.ascontiguousarray(features[sl]).data)
        release_rows(features, sl)
    return h.hexdigest()


def _streamed_rows(features: np.ndarray, transform: Callable[[np.ndarray, Any], np.ndarray]
                   ) -> Callable[[Any], np.ndarray]:
    """``rows(idx)`` = ``transform(features[idx], idx)`` as float32; after a slice of a
    memory-mapped bank is read its pages are released, so streaming over a bank on disk
    does not keep the file resident in this process."""

    def rows(idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            out = transform(features[idx], idx)
            release_rows(features, idx)
            return out
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or len(idx) == 0:
            return transform(features[idx], idx)
        # scattered rows (a training sample, the probe): the kernel maps the pages around
        # each one too (fault-around), so a large sample read at once would make most of the
        # file resident; read it in row order, a batch at a time, releasing each batch's span
        order = np.argsort(idx, kind="stable")
        out = None
        for part in np.array_split(order, -(-len(order) // _SCATTERED_BATCH)):
            sub = idx[part]
            block = transform(features[sub], sub)
            if out is None:
                out = np.empty((len(idx), *block.shape[1:]), dtype=block.dtype)
            out[part] = block
            release_rows(features, slice(int(sub[0]), int(sub[-1]) + 1))
        return out

    return rows


#: Rows of a scattered read (`_streamed_rows`) gathered between two page releases.
_SCATTERED_BATCH = 8192


def _normalized_rows(features: np.ndarray) -> Callable[[Any], np.ndarray]:
    return _streamed_rows(features, lambda x, idx: _unit32(x))


def _recall(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    k = exact_ids.shape[1]
    hits = [len(np.intersect1d(e, a[a >= 0])) for e, a in zip(exact_ids, approx_ids)]
    return float(np.mean(hits) / k)


def knn_recall_at_k(
    bank: np.ndarray,
    queries: np.ndarray,
    k: int = 50,
    index: str = "ivf",
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    sample: int | None = 1000,
    normalize: bool = True,
    seed: int = 0,
) -> float:
    """Recall@k of an approximate faiss index against exact search, on a query sample.

    The fraction of each query's exact k nearest bank vectors (cosine / normalised L2, as
    `KNN` uses) that the approximate index also returns, averaged over up to ``sample``
    queries drawn with ``seed``. 1.0 means the approximate index is exact on this sample.
    """
    if sample is not None and len(queries) > sample:
        rng = np.random.default_rng(seed)
        queries = queries[np.sort(rng.choice(len(queries), sample, replace=False))]
    if k > len(bank):
        raise ValueError(f"k={k} exceeds the {len(bank)} bank vectors.")
    if normalize:
        rows, queries = _normalized_rows(bank), _normalized32(queries)
    else:
        rows = lambda idx: np.asarray(bank[idx], dtype=np.float32)  # noqa: E731
    n, d = bank.shape
    exact = _InnerProductIndex(rows, n, d, "flat").search(queries, k)[1]
    approx = _InnerProductIndex(
        rows, n, d, index, nlist=nlist, nprobe=nprobe, pq_m=pq_m, seed=seed
    ).search(queries, k)[1]
    return _recall(exact, approx)


class _NeighborBank(Detector):
    """What the detectors with a neighbour bank share: the search index, chosen by
    ``index``, and the recall guarantee of approximate search.

    ``index="exact"`` (alias ``"flat"``) searches exhaustively; ``"ivf"``, ``"hnsw"`` and
    ``"ivfpq"`` are faiss approximate indexes; ``"auto"`` is exact for banks up to
    `AUTO_APPROXIMATE_ABOVE` rows and IVF above. An approximate index measures recall@k at
    fit time on a held-out probe of the bank (``probe_size`` bank rows searched without
    themselves, against exact search) and, unless ``nprobe`` / ``ef_search`` is given,
    raises it until recall@k ≥ ``target_recall``. ``auto`` keeps the IVF index only when
    it reached the target *and* searched the probe faster than exact search did; else it
    searches exactly. An explicit ``ivf`` always reaches the target (probing every cell is
    exhaustive); ``hnsw`` and ``ivfpq`` warn when they cannot. The outcome is recorded:
    ``index_kind_``, ``recall_at_k_``, ``nprobe_`` / ``ef_search_`` and `fit_summary`.
    Scoring with (or tuning to) a larger k than the calibrated one re-measures first.
    """

    def _check_params(self) -> None:
        _check_positive_int("k", self.k)
        _check_subsample(self.subsample)
        self._check_index_params()

    def _check_index_params(self) -> None:
        if self.index not in _INDEX_CHOICES:
            raise ValueError(f"index must be one of {_INDEX_CHOICES}, got {self.index!r}.")
        if self.backend not in ("auto", "faiss", "numpy"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'numpy', got {self.backend!r}.")
        if self.backend == "numpy" and self.index not in ("exact", "flat", "auto"):
            raise ValueError("backend='numpy' only supports exact search (index='exact' or 'auto').")
        if self.storage not in _STORAGES:
            raise ValueError(f"storage must be one of {_STORAGES}, got {self.storage!r}.")
        for name in ("nlist", "nprobe", "pq_m", "ef_search"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        _check_positive_int("hnsw_m", self.hnsw_m)
        _check_positive_int("probe_size", self.probe_size)
        t = self.target_recall
        if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool)
                                  and 0.0 < t <= 1.0):
            raise ValueError(f"target_recall must be None or in (0, 1], got {t!r}.")

    def _resolve_kind(self, n: int) -> str:
        if self.index in ("exact", "flat"):
            return "flat"
        if self.index == "auto":
            if n <= AUTO_APPROXIMATE_ABOVE or self.backend == "numpy" or _import_faiss() is None:
                return "flat"
            return "ivf"
        return self.index

    def _build_index(self, rows: Callable[[Any], np.ndarray], n: int, d: int) -> None:
        kind = self._resolve_kind(n)

        def build(kind: str) -> _InnerProductIndex:
            recall = {"k": self.k, "target": self.target_recall, "probe_size": self.probe_size,
                      "seed": self.seed}
            return _InnerProductIndex(
                rows, n, d, kind, self.backend, self.nlist, self.nprobe, self.pq_m, self.seed,
                storage=self.storage, hnsw_m=self.hnsw_m, ef_search=self.ef_search,
                recall=recall,
            )

        index = build(kind)
        self._auto_note_ = ""
        cal = index.calibration
        if cal is not None:
            reached = self.target_recall is None or cal["recall"] >= self.target_recall
            if self.index == "auto" and (not reached or cal["search_s"] >= cal["exact_s"]):
                self._auto_note_ = (
                    f"auto: exact search (ivf reached recall@{cal['k']} {cal['recall']:.4f} with "
                    f"nprobe={cal['value']} in {cal['search_s']:.3g}s for the {cal['probe']}-row "
                    f"probe vs {cal['exact_s']:.3g}s exact)"
                )
                index = build("flat")
            elif not reached:
                import warnings

                warnings.warn(
                    f"{type(self).__name__}: index={kind!r} reached recall@{cal['k']} "
                    f"{cal['recall']:.4f} < target {self.target_recall} at {cal['knob']}="
                    f"{cal['value']}; use index='ivf' or 'exact' for the target.",
                    RuntimeWarning, stacklevel=4,
                )
        self.index_ = index

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index_.ensure_recall(k)
        return self.index_.search(queries, k)

    def _search_features(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`_search` for the L2-normalised ``features``, normalised and searched in chunks."""
        self.index_.ensure_recall(k)
        return self.index_.search_rows(features, _normalized_rows(features), k)

    def plan_score_params(self, values: dict[str, list[Any]]) -> None:
        """Calibrate the approximate index for the largest k about to be scored."""
        ks = [k for k in values.get("k", ()) if isinstance(k, (int, np.integer))]
        if ks:
            self.index_.ensure_recall(int(max(ks)))

    # ------------------------------------------------------------ what the fit chose
    @property
    def index_kind_(self) -> str:
        return "exact" if self.index_.kind == "flat" else self.index_.kind

    @property
    def recall_at_k_(self) -> float:
        """Measured recall@k of the search (1.0 for exact search)."""
        cal = self.index_.calibration
        return 1.0 if cal is None else float(cal["recall"])

    @property
    def nprobe_(self) -> int | None:
        return self.index_.knob if self.index_.knob_name == "nprobe" else None

    @property
    def ef_search_(self) -> int | None:
        return self.index_.knob if self.index_.knob_name == "ef_search" else None

    def fit_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index_kind_}
        cal = self.index_.calibration
        if cal is not None:
            out[f"recall@{cal['k']}"] = round(float(cal["recall"]), 4)
            out["probe"] = cal["probe"]
            out[cal["knob"]] = self.index_.knob
        if getattr(self, "_auto_note_", ""):
            out["note"] = self._auto_note_
        return out


@register("knn", "deep_knn")
class KNN(_NeighborBank):
    """Deep nearest neighbours (Sun et al., ICML 2022).

    Train and test features are L2-normalised; the score is ``−‖ẑ − ẑ_(k)‖``, minus the
    Euclidean distance to the k-th nearest training feature (default k=50, the paper's
    CIFAR setting; the paper uses k=1000 with a 1% subsample on ImageNet).
    ``subsample`` keeps a seeded random fraction (float) or count (int) of the bank.

    Search (see ``_NeighborBank``): ``index="auto"`` (default) is exact up to
    200,000 bank rows and a recall-calibrated IVF above; ``"exact"`` is faiss
    ``IndexFlatIP`` (or a chunked numpy GEMM when faiss is missing or
    ``backend="numpy"``); ``"ivf"``, ``"hnsw"``, ``"ivfpq"`` are faiss approximate indexes
    whose recall@k is measured at fit time and raised to ``target_recall``.

    Cost: exact search is one ``N_test × N_bank × D`` float32 GEMM plus a top-k heap; on a
    two-core AVX-512 CPU that is about 10 s of single-core time for 20k queries against 50k
    512-d features (~100 GFLOP/s, the hardware floor of exact search). IVF only pays off
    when the features have a low intrinsic dimension (the probed cells then hold the
    neighbours); ``auto`` measures that on the probe instead of assuming it.
    """

    requires = frozenset({"features"})
    fit_fields = frozenset({"features"})
    search_space = {"k": [1, 5, 10, 20, 50, 100, 200, 500, 1000]}
    score_params = frozenset({"k"})  # k does not change the fitted index
    reference = "Sun et al., Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022"

    def __init__(
        self,
        k: int = 50,
        subsample: float | int | None = None,
        index: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        pq_m: int | None = None,
        backend: str = "auto",
        seed: int = 0,
        ef_search: int | None = None,
        hnsw_m: int = 32,
        storage: str = "float32",
        target_recall: float | None = 0.99,
        probe_size: int = 1000,
    ):
        store_params(self, locals())

    def _fit(self, train: Features) -> None:
        idx = _subsample_indices(len(train), self.subsample, self.seed)
        feats = train.features if idx is None else train.features[idx]
        if self.k > len(feats):
            raise ValueError(
                f"k={self.k} exceeds the {len(feats)} training features kept for the bank; "
                "lower k or keep more samples (subsample)."
            )
        self.bank_size_ = len(feats)
        self.bank_indices_ = idx  # None: the whole training set
        self._build_index(_normalized_rows(feats), len(feats), feats.shape[1])

    def _score(self, x: Features) -> np.ndarray:
        sims = self._search_features(x.features, self.k)[0][:, self.k - 1].astype(np.float64)
        sims = np.where(np.isfinite(sims), sims, -1.0)  # no k-th neighbour found: farthest
        return -np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, 4.0))

    def recall_at_k(
        self, x: Features | np.ndarray, train: Features | np.ndarray, sample: int | None = 1000
    ) -> float:
        """Recall@k of this fitted index against exact search on (a sample of) ``x``.

        ``train`` must be the Features (or feature array) the detector was fitted on: the
        exact reference is rebuilt from it (the fitted index keeps no second copy).
        """
        if not self.is_fitted:
            raise ValueError("Fit the detector before measuring recall.")
        feats = x.features if isinstance(x, Features) else np.asarray(x)
        bank = train.features if isinstance(train, Features) else np.asarray(train)
        if self.bank_indices_ is not None:
            bank = bank[self.bank_indices_]
        if len(bank) != self.bank_size_:
            raise ValueError(
                f"train has {len(bank)} bank rows but the index holds {self.bank_size_}; "
                "pass the Features the detector was fitted on."
            )
        if sample is not None and len(feats) > sample:
            rng = np.random.default_rng(self.seed)
            feats = feats[np.sort(rng.choice(len(feats), sample, replace=False))]
        queries = _normalized32(feats)
        exact = stream_topk(_normalized_rows(bank), len(bank), queries, self.k)[1]
        return _recall(exact, self._search(queries, self.k)[1])


@register("nnguide")
class NNGuide(_NeighborBank):
    """Nearest-neighbour guidance (Park et al., ICCV 2023).

    The guide bank holds L2-normalised training features each scaled by its energy
    (``logsumexp`` of its logits). The score is ``energy(x) · mean_{top-k} ⟨ẑ, g_j⟩``: the
    classifier confidence times the mean inner product of the normalised test feature with
    its k best-matching guides. ``subsample`` keeps a seeded fraction/count of the bank
    (the paper subsamples ImageNet's training set). Search as in `KNN`: exact up to
    200,000 guides with the default ``index="auto"``, a recall-calibrated approximate
    index above or on request.
    """

    requires = frozenset({"features", "logits"})
    fit_fields = frozenset({"features", "logits"})
    search_space = {"k": [1, 5, 10, 20, 50, 100]}
    score_params = frozenset({"k"})
    reference = (
        "Park et al., Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023"
    )

    def __init__(
        self,
        k: int = 10,
        subsample: float | int | None = None,
        backend: str = "auto",
        seed: int = 0,
        index: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        pq_m: int | None = None,
        ef_search: int | None = None,
        hnsw_m: int = 32,
        storage: str = "float32",
        target_recall: float | None = 0.99,
        probe_size: int = 1000,
    ):
        store_params(self, locals())

    def _fit(self, train: Features) -> None:
        idx = _subsample_indices(len(train), self.subsample, self.seed)
        sub = train if idx is None else train[idx]
        if self.k > len(sub):
            raise ValueError(f"k={self.k} exceeds the {len(sub)} guide-bank samples; lower k.")
        energy = map_chunks(lambda sl: logsumexp(_logits(sub, sl), axis=1), len(sub)).astype(
            np.float32
        )
        guides = _streamed_rows(sub.features, lambda x, idx: _unit32(x) * energy[idx, None])
        self._build_index(guides, len(sub), sub.features.shape[1])

    def _score(self, x: Features) -> np.ndarray:
        energy = logsumexp(x.logits, axis=1)
        guidance = self._search_features(x.features, self.k)[0].astype(np.float64).mean(1)
        return energy * guidance


# -------------------------------------------------------------- subspace methods
#: ViM/residual: rows whose residual is below this fraction of ‖x − u‖² are recomputed
#: with the residual basis instead of as a difference through the principal basis.
_MIN_RESIDUAL_FRACTION = 0.05

#: fDBD: rows used to estimate the feature scale for the distance floor.
_FDBD_FLOOR_ROWS = 4096


def vim_default_dim(num_features: int) -> int:
    """Principal-subspace size used by the ViM paper's code: 1000 for D ≥ 1500 (ResNet-50's
    2048, BiT), 512 for D ≥ 768 (ViT-B, DeiT, Swin), else D/2."""
    if num_features >= 1500:
        return 1000
    if num_features >= 768:
        return 512
    return max(1, num_features // 2)


class _PrincipalResidual(Detector):
    """Residual of features, taken relative to ``u = −W⁺b``, outside their principal subspace."""

    requires = frozenset({"features", "head"})
    fit_fields = frozenset({"features", "head"})
    #: ``None`` = the paper's rule (`vim_default_dim`); sizes >= the feature width are
    #: skipped by the tuner with their error recorded.
    search_space = {"dim": [None, 8, 16, 32, 64, 128, 256, 512, 1000]}

    def __init__(self, dim: int | None = None, chunk_size: int | None = None):
        self.dim = dim
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        if self.dim is not None:
            _check_positive_int("dim", self.dim)
        _check_chunk_size(self.chunk_size)

    def _fit_subspace(self, train: Features) -> None:
        d = train.features.shape[1]
        dim = vim_default_dim(d) if self.dim is None else int(self.dim)
        if dim >= d:
            raise ValueError(
                f"dim={dim} must be smaller than the feature width {d} "
                "(the residual space would be empty)."
            )
        w = np.asarray(train.head_weight, dtype=np.float64)
        b = (
            np.zeros(w.shape[0])
            if train.head_bias is None
            else np.asarray(train.head_bias, dtype=np.float64)
        )
        with single_threaded_blas():
            self.origin_ = -np.linalg.pinv(w) @ b
        acc = _accumulate(
            train.features, None, 1, self.chunk_size, f"{self.name} fit", reference=self.origin_
        )
        # ViM's covariance is taken about u, not about the data mean (assume_centered=True)
        moment = acc.second_moment_about_reference() / acc.total
        with single_threaded_blas():
            vals, vecs = np.linalg.eigh(moment)
        order = np.argsort(vals)[::-1]
        self.dim_ = dim
        self.residual_basis_ = np.ascontiguousarray(vecs[:, order[dim:]])
        self._basis32_ = self.residual_basis_.astype(np.float32)
        self._origin32_ = self.origin_.astype(np.float32)
        # ‖aP⊥‖² = ‖a‖² − ‖aPₚ‖²: a GEMM with the smaller principal basis when dim < D/2
        self._principal32_ = (
            np.ascontiguousarray(vecs[:, order[:dim]], dtype=np.float32) if 2 * dim < d else None
        )

    def _residual_sq(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(‖(x − u)P⊥‖², ‖x − u‖²) per row of one chunk, float64 results of float32 GEMMs.

        Through the principal basis the residual is a difference; rows where it is under
        `_MIN_RESIDUAL_FRACTION` of ‖x − u‖² (where float32 round-off of the projection
        could cost more than ~1e-5 of the residual; measured ≤ 3.4e-6 on the
        benchmark of benchmarks/vs_pytorch_ood.py) are recomputed with the residual basis.
        """
        a = np.asarray(features, dtype=np.float32) - self._origin32_
        total = np.einsum("ij,ij->i", a, a, dtype=np.float64)
        if self._principal32_ is None:
            r = a @ self._basis32_
            return np.einsum("ij,ij->i", r, r, dtype=np.float64), total
        p = a @ self._principal32_
        res = total - np.einsum("ij,ij->i", p, p, dtype=np.float64)
        risky = np.flatnonzero(res < _MIN_RESIDUAL_FRACTION * total)
        if len(risky):
            r = a[risky] @ self._basis32_
            res[risky] = np.einsum("ij,ij->i", r, r, dtype=np.float64)
        return res, total

    def residual_norm(self, features: np.ndarray) -> np.ndarray:
        """‖(x − u) P_⊥‖ per row, chunked float32 GEMMs."""
        return map_chunks(
            lambda sl: np.sqrt(np.maximum(self._residual_sq(features[sl])[0], 0.0)),
            len(features),
            self.chunk_size,
        )


@register("residual")
class Residual(_PrincipalResidual):
    """Norm of the feature residual outside the principal subspace, negated (the residual
    part of ViM without the energy; Wang et al., CVPR 2022). Score ``−‖(x − u) P_⊥‖``."""

    requires = frozenset({"features"})  # the origin and subspace come from the fit
    reference = "Wang et al., ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    #: The generic far-OOD test puts OOD near the origin with the same off-subspace energy as
    #: ID noise, which a residual-only score cannot see; its sign is tested in
    #: tests/test_detectors_distance.py on OOD that leaves the principal subspace.
    sign_test_exempt = (
        "residual norm ignores the principal subspace; the synthetic far OOD "
        "differs from ID only inside it"
    )

    def _fit(self, train: Features) -> None:
        self._fit_subspace(train)

    def _score(self, x: Features) -> np.ndarray:
        return -self.residual_norm(x.features)


@register("vim")
class ViM(_PrincipalResidual):
    """Virtual-logit matching (Wang et al., CVPR 2022).

    With origin ``u = −W⁺b`` (so the head maps u to zero logits), the principal subspace is
    spanned by the top ``dim`` eigenvectors of ``E[(x − u)(x − u)ᵀ]`` over training
    features (`vim_default_dim` when ``dim`` is None) and ``P_⊥`` projects onto the rest.
    ``α = mean_train max-logit / mean_train ‖(x − u)P_⊥‖`` and the score is
    ``energy(x) − α‖(x − u)P_⊥‖`` (the paper's −(virtual-logit softmax) is a monotone
    function of this). Uses the stored logits when present, else the head.
    """

    reference = "Wang et al., ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"

    def _fit(self, train: Features) -> None:
        self._fit_subspace(train)
        res_sum = 0.0
        max_logit_sum = 0.0
        norm_sum = 0.0
        for sl in iter_chunks(len(train), self.chunk_size):
            res_sq, total_sq = self._residual_sq(train.features[sl])
            res_sum += float(np.sqrt(np.maximum(res_sq, 0.0)).sum())
            norm_sum += float(np.sqrt(total_sq).sum())
            # the max is exact in the logits' own dtype; sum in float64
            max_logit_sum += float(np.asarray(_logits(train, sl)).max(1).sum(dtype=np.float64))
            release_rows(train.features, sl)  # after _logits, which may read the rows again
        mean_res = res_sum / len(train)
        if not mean_res > 1e-6 * (norm_sum / len(train)):
            raise ValueError(
                f"ViM: training features have almost no component outside their {self.dim_}-d "
                "principal subspace (rank-deficient or constant features), so the virtual-logit "
                "scale alpha is undefined; lower `dim` or use 'energy'."
            )
        self.alpha_ = (max_logit_sum / len(train)) / mean_res

    def _score(self, x: Features) -> np.ndarray:
        energy = map_chunks(lambda sl: logsumexp(_logits(x, sl), axis=1), len(x), self.chunk_size)
        return energy - self.alpha_ * self.residual_norm(x.features)


# ------------------------------------------------------------- other feature scores
@register("she")
class SHE(Detector):
    """Simplified Hopfield energy (Zhang et al., ICLR 2023).

    Stored pattern of class c = mean feature of the training samples of class c that the
    network classifies correctly; score = inner product of the feature with the pattern of
    the predicted class (``argmax`` logits). A class with no correct training sample falls
    back to the mean of its samples; a class absent from training has a zero pattern (score 0).
    """

    requires = frozenset({"features", "logits"})
    fit_fields = frozenset({"features", "logits", "labels"})
    reference = (
        "Zhang et al., Out-of-Distribution Detection based on In-Distribution Data "
        "Patterns Memorization with Modern Hopfield Energy, ICLR 2023"
    )

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        _check_chunk_size(self.chunk_size)

    def _fit(self, train: Features) -> None:
        c = _num_classes(train)
        d = train.features.shape[1]
        correct_sum, correct_n = np.zeros((c, d)), np.zeros(c)
        all_sum, all_n = np.zeros((c, d)), np.zeros(c)
        for sl in iter_chunks(len(train), self.chunk_size):
            f = np.asarray(train.features[sl], dtype=np.float64)
            y = train.labels[sl]
            ok = np.asarray(train.logits[sl]).argmax(1) == y
            for target_sum, target_n, mask in (
                (correct_sum, correct_n, ok),
                (all_sum, all_n, slice(None)),
            ):
                target_sum += _group_sums(f[mask], y[mask], c)
                target_n += np.bincount(y[mask], minlength=c)
        patterns = np.zeros((c, d))
        has_correct = correct_n > 0
        patterns[has_correct] = correct_sum[has_correct] / correct_n[has_correct, None]
        fallback = ~has_correct & (all_n > 0)
        patterns[fallback] = all_sum[fallback] / all_n[fallback, None]
        self.patterns_ = patterns
        self._patterns32_ = patterns.astype(np.float32)

    def _score(self, x: Features) -> np.ndarray:
        def one(sl: slice) -> np.ndarray:
            pred = np.asarray(x.logits[sl]).argmax(1)
            f = np.asarray(x.features[sl], dtype=np.float32)
            return np.einsum("ij,ij->i", f, self._patterns32_[pred], dtype=np.float64)

        return map_chunks(one, len(x), self.chunk_size)


def _power(a: np.ndarray, p: float) -> np.ndarray:
    """``a ** p`` in place; integer powers by repeated squaring (much faster than pow)."""
    if float(p).is_integer() and 1 <= p <= 64:
        p = int(p)
        result = None
        base = a
        while p:
            if p & 1:
                result = base.copy() if result is None else np.multiply(result, base, out=result)
            p >>= 1
            if p:
                base = base * base if base is a else np.multiply(base, base, out=base)
        return result
    return np.power(a, p, out=a)


@register("relation", "nrg")
class Relation(Detector):
    """Neural Relation Graph OOD score (Kim et al., NeurIPS 2023), as in OpenOOD.

    Relation between a test sample and each training sample j:
    ``r_j = max(⟨ẑ, ẑ_j⟩, 0) · ⟨p, p_j⟩`` (cosine similarity of L2-normalised features times
    the inner product of softmax vectors). Edges with ``r_j ≤ threshold`` are dropped and the
    score is ``Σ_j r_j^pow`` — the total edge weight to the training graph (higher = ID).
    """

    requires = frozenset({"features", "logits"})
    fit_fields = frozenset({"features", "logits"})
    search_space = {"pow": [1, 2, 4, 8, 16]}
    score_params = frozenset({"pow"})  # pow only shapes the sum over the relation matrix
    reference = (
        "Kim et al., Neural Relation Graph: A Unified Framework for Identifying Label "
        "Noise and Outlier Data, NeurIPS 2023"
    )
    transient_state = frozenset({"_score_cache_", "_planned_pows_", "_blocks_"})
    _CACHE_ENTRIES = 4

    def __init__(
        self,
        pow: float = 8,
        threshold: float = 0.03,
        subsample: float | int | None = None,
        seed: int = 0,
    ):
        store_params(self, locals())

    def _check_params(self) -> None:
        if not (isinstance(self.pow, (int, float)) and self.pow > 0):
            raise ValueError(f"pow must be > 0, got {self.pow!r}.")
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < 1):
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}.")
        _check_subsample(self.subsample)

    def _fit(self, train: Features) -> None:
        idx = _subsample_indices(len(train), self.subsample, self.seed)
        sub = train if idx is None else train[idx]
        feats = _normalized32(sub.features)
        probs = map_chunks(lambda sl: softmax(sub.logits[sl], axis=1), len(sub)).astype(np.float32)
        # Bank rows grouped by predicted class, most confident first, so that the blocks of
        # _relation_sums hold rows of one class with little probability off it (the sum
        # over the bank does not depend on its order).
        pred = probs.argmax(axis=1)
        order = np.lexsort((_off_class_mass(probs, pred), pred))
        self.bank_features_ = feats[order]
        self.bank_probs_ = probs[order]
        # Shared by shallow copies (the tuner's score-time candidates); emptied by a refit.
        self._score_cache_: dict[Any, dict[float, np.ndarray]] = {}
        self._planned_pows_: list[float] = []

    def plan_score_params(self, values: dict[str, list[Any]]) -> None:
        """Announce the ``pow`` values about to be scored (the tuner calls this): the first
        score of a query set then sums the relation matrix for all of them in one pass."""
        self._planned_pows_[:] = [
            float(p) for p in values.get("pow", ()) if isinstance(p, (int, float))
        ]

    def _score(self, x: Features) -> np.ndarray:
        """Σ_j r_j^pow. The relation matrix is computed once per query set for every planned
        ``pow`` and the per-query sums are kept (the last few query sets, keyed by their
        bytes), so tuning over ``pow`` costs one pass per validation split."""
        pow_ = float(self.pow)
        feats = np.ascontiguousarray(x.features)
        logits = np.ascontiguousarray(x.logits)
        key = (float(self.threshold), array_key(feats, logits))
        cache = self.__dict__.get("_score_cache_")
        if cache is not None and key in cache and pow_ in cache[key]:
            return cache[key][pow_].copy()
        pows = [pow_] + [p for p in dict.fromkeys(getattr(self, "_planned_pows_", ())) if p != pow_]
        sums = self._relation_sums(x, pows)
        if cache is not None:
            remember(cache, key, sums, self._CACHE_ENTRIES)
        return sums[pow_].copy()

    def _relation_sums(self, x: Features, pows: list[float]) -> dict[float, np.ndarray]:
        """``Σ_j r_j^pow`` per query for every ``pow``, block by block of the bank.

        A block is skipped for the queries it cannot reach: for bank rows of predicted class
        ``c`` whose probability off ``c`` is at most ``u`` (the block's largest), ``⟨p, p_j⟩
        ≤ p_c + u·max_{k≠c} p_k``, and with ``cos ≤ 1`` that bounds ``r_j``; below the
        threshold (with a margin for float32 round-off) every edge of the block is dropped
        anyway. A confident network thus scores each query against little more than the
        bank rows of its own class."""
        out = {p: np.zeros(len(x)) for p in pows}
        if "_blocks_" not in self.__dict__:
            self._blocks_ = _class_blocks(self.bank_probs_)
        starts, classes, off_mass = self._blocks_
        threshold = float(self.threshold)
        last = len(pows) - 1
        for sl in iter_chunks(len(x), _RELATION_QUERY_ROWS):
            z = _normalized32(x.features[sl])
            p = softmax(x.logits[sl], axis=1).astype(np.float32)
            p64 = p.astype(np.float64)
            top2 = np.sort(p64, axis=1)[:, -2:] if p.shape[1] > 1 else np.c_[p64, p64]
            top_class = p64.argmax(axis=1)
            for b, c in enumerate(classes):
                other = np.where(top_class == c, top2[:, 0], top2[:, 1])  # max off class c
                bound = p64[:, c] + other * off_mass[b]
                active = np.flatnonzero(bound * (1.0 + 1e-4) + 1e-12 >= threshold)
                if active.size == 0:
                    continue
                bank = slice(starts[b], starts[b + 1])
                everyone = active.size == len(p)
                za, pa = (z, p) if everyone else (z[active], p[active])
                rel = za @ self.bank_features_[bank].T
                np.maximum(rel, 0.0, out=rel)
                rel *= pa @ self.bank_probs_[bank].T
                rel *= rel > threshold
                rows = np.arange(sl.start, sl.stop)[active]
                for i, q in enumerate(pows):
                    # _power works in place for non-integer exponents: keep rel for the others
                    in_place = not (float(q).is_integer() and 1 <= q <= 64)
                    base = rel.copy() if in_place and i != last else rel
                    out[q][rows] += _power(base, q).sum(1, dtype=np.float64)
        return out


#: Bank rows per block of Relation's pruned sum, and query rows per chunk.
_RELATION_BLOCK = 256
_RELATION_QUERY_ROWS = 2048


def _off_class_mass(probs: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Each row's probability off its predicted class, in float64."""
    return probs.astype(np.float64).sum(axis=1) - probs[np.arange(len(probs)), pred]


def _class_blocks(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, classes, off_mass)`` of Relation's bank blocks: runs of rows with the same
    predicted class, cut every `_RELATION_BLOCK` rows; ``starts`` ends with the bank size,
    ``off_mass`` is each block's largest probability off its class. Any row order is
    valid; the fit's order (by class, most confident first) makes the bounds tight."""
    pred = probs.argmax(axis=1)
    off = _off_class_mass(probs, pred)
    starts = []
    for run_start, run_stop in zip(*_runs(pred)):
        starts.extend(range(run_start, run_stop, _RELATION_BLOCK))
    starts = np.asarray(starts + [len(pred)], dtype=np.int64)
    return starts, pred[starts[:-1]], np.maximum.reduceat(off, starts[:-1])


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop indices of the runs of equal consecutive values."""
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    return np.r_[0, change], np.r_[change, len(values)]


def _distances_to(f: np.ndarray, point: np.ndarray, block: int = 1024) -> np.ndarray:
    """float64 ``‖f_i − point‖`` of float32 rows, in cache-sized blocks (one reused buffer
    instead of a fresh chunk-sized difference array)."""
    out = np.empty(len(f))
    buf = np.empty((min(block, len(f)), f.shape[1]), dtype=f.dtype)
    for start in range(0, len(f), block):
        rows = f[start : start + block]
        diff = buf[: len(rows)]
        np.subtract(rows, point, out=diff)
        # squares in float64: float32 features of magnitude 1e20 and up would overflow
        out[start : start + len(rows)] = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
    return np.sqrt(out)


@register("fdbd")
class FDBD(Detector):
    """Fast decision-boundary distance (Liu & Qin, ICML 2024).

    For the predicted class ŷ, the feature's distance to the boundary with each other class c
    is ``|(w_ŷ − w_c)ᵀz + (b_ŷ − b_c)| / ‖w_ŷ − w_c‖``; the score is their mean over c ≠ ŷ
    divided by ``‖z − μ_train‖`` (distance to the training feature mean). Logits are
    recomputed from the features with the head so the geometry is consistent.
    """

    requires = frozenset({"features", "head"})
    fit_fields = frozenset({"features"})
    reference = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        _check_chunk_size(self.chunk_size)

    def _fit(self, train: Features) -> None:
        total = np.zeros(train.features.shape[1])
        for sl in iter_chunks(len(train), self.chunk_size):
            # float64 accumulation without a float64 copy of the chunk
            total += np.add.reduce(np.asarray(train.features[sl]), axis=0, dtype=np.float64)
        self.train_mean_ = total / len(train)
        # floor for ‖z − μ‖ so a test feature exactly at the mean stays finite: relative to
        # the features' RMS norm, estimated on the first rows (whatever the chunk size)
        head = np.asarray(train.features[:_FDBD_FLOOR_ROWS], dtype=np.float64)
        rms = np.sqrt(np.einsum("ij,ij->", head, head) / len(head))
        self.norm_floor_ = max(1e-12 * rms, 1e-300)

    def _score(self, x: Features) -> np.ndarray:
        w = np.asarray(x.head_weight, dtype=np.float64)
        c = w.shape[0]
        if c < 2:
            raise ValueError("fdbd needs a head with at least two classes.")
        sq = np.einsum("ij,ij->i", w, w)
        pair = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0, None))
        pair = np.maximum(pair, 1e-12 * max(pair.max(), 1e-300))  # identical rows: avoid 0/0
        mean32 = self.train_mean_.astype(np.float32)

        def one(sl: slice) -> np.ndarray:
            f = np.asarray(x.features[sl], dtype=np.float32)
            # classes along axis 0: per-sample reductions over few classes are much faster
            # as vectorised column operations than as many short row reductions
            logits = np.array(x.logits_from_features(f).T, dtype=np.float64, order="C")
            pred = logits.argmax(0)
            top = logits[pred, np.arange(len(f))]
            gaps = np.abs(top - logits) / pair[:, pred]  # pair is symmetric
            mean_gap = gaps.sum(0) / (c - 1)  # the ŷ term is zero
            dist = _distances_to(f, mean32)
            return mean_gap / np.maximum(dist, self.norm_floor_)

        return map_chunks(one, len(x), self.chunk_size)
