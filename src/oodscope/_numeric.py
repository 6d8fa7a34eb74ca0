"""Small numerically careful helpers shared by detectors (float64 where it matters)."""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.special import logsumexp as _logsumexp

__all__ = [
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


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Divide by the L2 norm; zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


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
