"""Small numerically careful helpers shared by detectors (float64 where it matters)."""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.special import logsumexp as _logsumexp

__all__ = [
    "array_key",
    "remember",
    "softmax",
    "log_softmax",
    "logsumexp",
    "l2_normalize",
    "shrunk_covariance_inverse",
    "single_threaded_blas",
]


def single_threaded_blas():
    """Context manager limiting BLAS/OpenMP to one thread (a no-op without threadpoolctl).

    For small dense LAPACK calls (eigh, pinv, cholesky on d×d matrices): on a busy machine
    their many short synchronisation steps make extra threads ruinous (a 512×512 ``eigh``
    took 5.75 s with 2 OpenBLAS threads against 0.065 s with one). Large GEMMs keep the
    default thread count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis`` in float64, shifted by the max (no overflow)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    if not np.all(np.isfinite(m)):  # -inf rows etc.: let scipy handle the edge cases
        return _logsumexp(x, axis=axis, keepdims=keepdims)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(x, axis=axis))


#: Row norms inside these bounds are computed directly; outside them (where squaring the
#: entries overflows or underflows, e.g. features in units of 1e30 or 1e-30) rows are first
#: divided by their largest magnitude, so normalising never depends on the units.
_SAFE_NORM = {np.dtype(np.float32): (1e-15, 1e15), np.dtype(np.float64): (1e-150, 1e150)}


def l2_normalize(x: np.ndarray, axis: int = -1, dtype: type | None = None) -> np.ndarray:
    """Divide by the L2 norm along ``axis``; zero rows stay zero instead of becoming NaN.

    Works in the input's precision (float32 for float16/float32, float64 otherwise) and is
    scale-invariant whatever the magnitude: rows whose norm would overflow or underflow are
    rescaled by their max-abs first. ``dtype`` casts the unit-norm result (e.g. float64
    features normalised in float64, then stored as float32).
    """
    x = np.asarray(x)
    given = x
    if x.dtype not in _SAFE_NORM:
        x = x.astype(np.float32 if x.dtype == np.float16 else np.float64)
    lo, hi = _SAFE_NORM[x.dtype]
    with np.errstate(over="ignore", under="ignore"):
        norm = np.linalg.norm(x, axis=axis, keepdims=True)
    extreme = ~((norm >= lo) & (norm <= hi))
    if extreme.any():
        peak = np.max(np.abs(x), axis=axis, keepdims=True)
        divisor = np.where(extreme & (peak > 0), peak, 1.0).astype(x.dtype)
        x = x / divisor
        with np.errstate(over="ignore", under="ignore"):
            norm = np.where(extreme, np.linalg.norm(x, axis=axis, keepdims=True), norm)
        norm = np.where(norm > 0, norm, 1.0).astype(x.dtype)  # all-zero rows
    # divide in place when x is already a private copy (a float16 chunk of a memory-mapped
    # bank): one chunk-sized buffer fewer, the same values
    out = np.divide(x, norm, out=x) if x is not given else x / norm
    return out if dtype is None else out.astype(dtype, copy=False)


def shrunk_covariance_inverse(cov: np.ndarray, shrinkage: float = 1e-3) -> np.ndarray:
    """Inverse of ``(1-s)·cov + s·(tr(cov)/d)·I``: a ridge relative to the covariance's scale.

    A fixed tiny ridge (e.g. 1e-6) is meaningless for features of scale 1e-4 or 1e4 and made
    another library's Mahalanobis score at chance; scaling by the mean eigenvalue keeps the
    conditioning the same whatever the units. Rank-deficient or constant features stay finite.
    """
    cov = np.asarray(cov, dtype=np.float64)
    d = cov.shape[0]
    scale = np.trace(cov) / d
    if not np.isfinite(scale):
        raise ValueError("Covariance has non-finite entries; check the features for NaN/inf.")
    if scale <= 0:  # all features constant: any direction is as (un)likely as any other
        scale = 1.0
    reg = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    with single_threaded_blas():
        return np.linalg.pinv(reg, hermitian=True)


def array_key(*arrays: np.ndarray) -> tuple:
    """A hashable key for the contents of arrays (shape, dtype and a 128-bit digest of the
    bytes of each): how the per-query-set caches of tuned detectors recognise a query set."""
    import hashlib

    parts = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        parts.append((a.shape, a.dtype.str, hashlib.blake2b(a.data, digest_size=16).hexdigest()))
    return tuple(parts)


def remember(cache: dict, key: object, value: object, limit: int) -> None:
    """Store ``value`` as the newest entry of an insertion-ordered ``cache``, dropping the
    oldest entries beyond ``limit`` (the per-query-set score caches of tuned detectors)."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
