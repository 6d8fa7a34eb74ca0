"""Streaming float64 statistics shared by the distance and density detectors.

Feature banks can be memory-mapped float16 arrays of ImageNet size (1.28M x 2048), so fits
read them chunk by chunk: each chunk is converted to float64, folded into running counts,
sums and scatter matrices, and dropped. No full float64 copy of the bank ever exists.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .._state import persistable

from .._numeric import single_threaded_blas

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "iter_chunks",
    "ScatterAccumulator",
    "whitening_from_precision",
    "GaussianScorer",
    "batched_shrunk_whitening",
    "map_chunks",
]

#: Rows per chunk when streaming over feature banks (8192 x 2048 x 8 bytes = 128 MiB float64).
DEFAULT_CHUNK_SIZE = 8192


def _chunk_size(chunk_size: int | None) -> int:
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    return size


def iter_chunks(n: int, chunk_size: int | None = None) -> Iterator[slice]:
    """Slices covering ``range(n)`` in order, ``chunk_size`` rows each."""
    size = _chunk_size(chunk_size)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def map_chunks(
    fn: Callable[[slice], np.ndarray], n: int, chunk_size: int | None = None
) -> np.ndarray:
    """Concatenate ``fn(slice)`` over the chunks of ``range(n)`` (row-wise results)."""
    return np.concatenate([fn(sl) for sl in iter_chunks(n, chunk_size)], axis=0)


class ScatterAccumulator:
    """Running per-group counts, means and within-group scatter, in float64.

    Each group ``g`` gets a fixed reference point ``r_g`` (the mean of its rows in the first
    chunk where it appears). Rows are shifted by their group's reference before the scatter
    GEMM, so the accumulated ``S = Σ (x - r_g)(x - r_g)ᵀ`` never holds the large common offset
    (post-ReLU features are far from the origin) that makes ``Σ xxᵀ - n μμᵀ`` lose digits.
    The within-group scatter is then ``S - Σ_g n_g (μ_g - r_g)(μ_g - r_g)ᵀ``, with small
    correction terms. One GEMM per chunk whatever the number of groups.

    ``reference`` fixes a single shared reference point instead (e.g. ViM's origin ``u``);
    with ``num_groups=1`` and a given reference, ``S`` is the exact second moment about it.
    """

    def __init__(self, dim: int, num_groups: int = 1, reference: np.ndarray | None = None):
        self.dim = int(dim)
        self.num_groups = int(num_groups)
        self.counts = np.zeros(self.num_groups, dtype=np.int64)
        self.sums = np.zeros((self.num_groups, self.dim))  # Σ (x - r_g)
        self.scatter = np.zeros((self.dim, self.dim))  # Σ (x - r_g)(x - r_g)ᵀ
        self.refs = np.zeros((self.num_groups, self.dim))
        self._has_ref = np.zeros(self.num_groups, dtype=bool)
        if reference is not None:
            self.refs[:] = np.asarray(reference, dtype=np.float64).reshape(1, self.dim)
            self._has_ref[:] = True

    def update(self, x: np.ndarray, groups: np.ndarray | None = None) -> "ScatterAccumulator":
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.dtype.itemsize > 8:
            x = x.astype(np.float64)
        # float16/32 rows stay as they are: widening is exact, and the float64 subtraction
        # of the reference below widens them without a separate float64 copy
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {x.shape}.")
        if groups is None:
            groups = np.zeros(len(x), dtype=np.int64)
        groups = np.asarray(groups, dtype=np.int64)
        counts = np.bincount(groups, minlength=self.num_groups)
        new = (counts > 0) & ~self._has_ref
        if new.any():
            sums = _group_sums(x.astype(np.float64), groups, self.num_groups)
            self.refs[new] = sums[new] / counts[new, None]
            self._has_ref |= new
        ref = self.refs[groups] if self.num_groups > 1 else self.refs[0]
        shifted = np.subtract(x, ref, dtype=np.float64)
        self.counts += counts
        self.sums += _group_sums(shifted, groups, self.num_groups)
        self.scatter += shifted.T @ shifted
        return self

    # --------------------------------------------------------------- results
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def present(self) -> np.ndarray:
        """Indices of groups that received at least one row."""
        return np.flatnonzero(self.counts > 0)

    def means(self) -> np.ndarray:
        """(num_groups, dim) group means; rows of empty groups are NaN."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.refs + self.sums / self.counts[:, None]

    def within_scatter(self) -> np.ndarray:
        """Σ_g Σ_{i∈g} (x_i - μ_g)(x_i - μ_g)ᵀ."""
        keep = self.counts > 0
        offsets = self.sums[keep] / self.counts[keep, None]  # μ_g - r_g
        out = self.scatter - (offsets * self.counts[keep, None]).T @ offsets
        return _symmetrize(out)

    def grand_mean(self) -> np.ndarray:
        keep = self.counts > 0
        return (self.counts[keep, None] * self.means()[keep]).sum(0) / self.total

    def total_scatter(self) -> np.ndarray:
        """Σ_i (x_i - μ)(x_i - μ)ᵀ over all rows: within plus between-group scatter."""
        keep = self.counts > 0
        centred = self.means()[keep] - self.grand_mean()
        between = (centred * self.counts[keep, None]).T @ centred
        return _symmetrize(self.within_scatter() + between)

    def second_moment_about_reference(self) -> np.ndarray:
        """Σ (x - r)(x - r)ᵀ for a shared reference ``r`` given at construction."""
        if self.num_groups != 1:
            raise ValueError("second_moment_about_reference needs a single group.")
        return _symmetrize(self.scatter.copy())


def _group_sums(x: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per-group row sums in O(n·d) (a sparse indicator product; np.add.at is far slower)."""
    if num_groups == 1:
        return x.sum(0, keepdims=True)
    from scipy import sparse

    n = len(groups)
    indicator = sparse.csr_matrix((np.ones(n), (groups, np.arange(n))), shape=(num_groups, n))
    return np.asarray(indicator @ x)


def progress(iterable, total: int, desc: str, min_total: int = 16):
    """A tqdm bar over chunks, shown only when there are many of them."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=total < min_total, leave=False)


def _symmetrize(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def whitening_from_precision(precision: np.ndarray) -> np.ndarray:
    """``L`` with ``L Lᵀ = precision``, so ``(x-μ)ᵀ P (x-μ) = ‖(x-μ) L‖²``.

    Cholesky when the precision is positive definite, else a clipped eigendecomposition
    (a pseudo-inverse of a rank-deficient covariance is only semi-definite).
    """
    precision = _symmetrize(np.asarray(precision, dtype=np.float64))
    with single_threaded_blas():
        try:
            return np.linalg.cholesky(precision)
        except np.linalg.LinAlgError:
            vals, vecs = np.linalg.eigh(precision)
            return vecs * np.sqrt(np.clip(vals, 0.0, None))


#: Rows per block inside a scoring chunk (2048 x 2048 float32 = 16 MiB at most).
_SCORE_BLOCK = 2048


@persistable
class GaussianScorer:
    """Squared Mahalanobis distances to a set of means under one shared precision.

    Scoring is one GEMM per chunk (float32 by default; float64 where a score subtracts two
    large distances, as RMDS does): rows are centred on ``center`` (the training mean,
    which removes the big common offset before the float32 cast), whitened with ``L`` and
    compared with the whitened means via ``‖a‖² - 2a·m + ‖m‖²``; tiny negative round-off is
    clipped to zero.
    """

    def __init__(
        self,
        means: np.ndarray,
        precision: np.ndarray,
        center: np.ndarray | None = None,
        dtype: type = np.float32,
    ):
        means = np.atleast_2d(np.asarray(means, dtype=np.float64))
        self.dtype = np.dtype(dtype)
        self.center = means.mean(0) if center is None else np.asarray(center, dtype=np.float64)
        whiten = whitening_from_precision(precision)
        self.whiten = whiten.astype(self.dtype)
        # a Cholesky factor is lower triangular: TRMM does half a GEMM's work
        self._lower = np.asfortranarray(self.whiten) if _is_lower(whiten) else None
        wm = (means - self.center) @ whiten
        self.wmeans = wm.astype(self.dtype)
        self.wmeans_sq = np.einsum("ij,ij->i", wm, wm)

    def get_state(self) -> dict:
        return {"dtype": self.dtype, "center": self.center, "whiten": self.whiten,
                "wmeans": self.wmeans, "wmeans_sq": self.wmeans_sq}

    @classmethod
    def from_state(cls, state: dict) -> "GaussianScorer":
        self = cls.__new__(cls)
        self.dtype = np.dtype(state["dtype"])
        self.center = np.asarray(state["center"], dtype=np.float64)
        self.whiten = np.asarray(state["whiten"], dtype=self.dtype)
        self.wmeans = np.asarray(state["wmeans"], dtype=self.dtype)
        self.wmeans_sq = np.asarray(state["wmeans_sq"], dtype=np.float64)
        d = len(self.center)
        if self.whiten.shape[0] != d or self.wmeans.shape[1:] != self.whiten.shape[1:]:
            raise ValueError("inconsistent Gaussian scorer shapes")
        self._lower = np.asfortranarray(self.whiten) if _is_lower(self.whiten) else None
        return self

    def sq_distances(self, x: np.ndarray, chunk_size: int | None = None) -> np.ndarray:
        """(n, n_means) float64 squared Mahalanobis distances."""
        center = self.center.astype(self.dtype)
        buf = np.empty((_SCORE_BLOCK, len(center)), dtype=self.dtype)

        def one(sl: slice) -> np.ndarray:
            # cache-sized blocks through one reused buffer: fresh chunk-sized temporaries
            # cost more in page faults than the arithmetic
            rows = np.asarray(x[sl])
            out = np.empty((len(rows), len(self.wmeans)))
            for start in range(0, len(rows), _SCORE_BLOCK):
                block = rows[start : start + _SCORE_BLOCK]
                centred = buf[: len(block)]
                np.subtract(block, center, out=centred, dtype=self.dtype)
                a = self._whiten_rows(centred)
                cross = a @ self.wmeans.T
                a_sq = np.einsum("ij,ij->i", a, a, dtype=np.float64)
                d = a_sq[:, None] - 2.0 * cross.astype(np.float64) + self.wmeans_sq[None, :]
                out[start : start + len(block)] = np.maximum(d, 0.0)
            return out

        return map_chunks(one, len(x), chunk_size)

    def _whiten_rows(self, centred: np.ndarray) -> np.ndarray:
        """``centred @ L``; for triangular ``L`` as ``(Lᵀ centredᵀ)ᵀ`` through BLAS TRMM."""
        if self._lower is None or len(centred) == 0:
            return centred @ self.whiten
        from scipy.linalg import blas

        trmm = blas.strmm if self.dtype == np.float32 else blas.dtrmm
        # centredᵀ is Fortran-ordered, so TRMM overwrites it in place (no copy)
        out = trmm(1.0, self._lower, centred.T, side=0, lower=1, trans_a=1, overwrite_b=1)
        return out.T


def _is_lower(a: np.ndarray) -> bool:
    return not np.any(np.triu(a, 1))


def batched_shrunk_whitening(covs: np.ndarray, shrinkage: float) -> np.ndarray:
    """Whitening matrices for a stack of covariances ``(..., d, d)``.

    Same regularisation as `oodscope._numeric.shrunk_covariance_inverse` (blend with the
    mean eigenvalue times the identity, pseudo-inverse), batched through one ``eigh``:
    returns ``L`` with ``L Lᵀ`` equal to the shrunk (pseudo-)inverse of each covariance.
    """
    covs = np.asarray(covs, dtype=np.float64)
    d = covs.shape[-1]
    scale = np.trace(covs, axis1=-2, axis2=-1) / d
    scale = np.where(scale > 0, scale, 1.0)
    reg = (1.0 - shrinkage) * covs + (shrinkage * scale)[..., None, None] * np.eye(d)
    with single_threaded_blas():
        vals, vecs = np.linalg.eigh(_symmetrize_batched(reg))
    # pinv's cut-off: eigenvalues below rcond·max are treated as zero
    cutoff = 1e-15 * d * np.abs(vals).max(axis=-1, keepdims=True)
    inv_sqrt = np.where(vals > cutoff, 1.0 / np.sqrt(np.where(vals > cutoff, vals, 1.0)), 0.0)
    return vecs * inv_sqrt[..., None, :]


def _symmetrize_batched(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + np.swapaxes(a, -1, -2))
