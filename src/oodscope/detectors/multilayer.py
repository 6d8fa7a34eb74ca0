"""Detectors that read several layers of cached activations (``Features.extras["layer:<m>"]``,
written by ``oodscope.extract(model, data, layers=[...])``):

* `MultiLayer` runs any feature-space detector on each layer and aggregates the per-layer
  scores (oodeel's mean / std / Fisher aggregators);
* `SEM` combines a high-level (penultimate) and a low-level (feature-statistics) Gaussian
  mixture density so that non-semantic style cancels out (Yang et al., full-spectrum OOD).

A 2-D layer array is used as it is; a feature map ``(N, C, H, W)`` is pooled per channel
(`oodscope.detectors._network.pool_layer`). The name ``"features"`` in ``layers`` stands for
the penultimate features themselves (a module that is itself called ``features``, like the
conv trunk of `oodscope.models.SmallCNN`, is reached through its last child, ``features.5``).
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Sequence

import numpy as np
from scipy import stats

from .._numeric import logsumexp, shrunk_covariance_inverse
from .._params import store_params
from ..features import Features
from ._network import ANY_LAYER, InstanceNeeds, InstanceNeedsMethod, layer_key, pool_layer
from ._stats import whitening_from_precision
from .base import Detector, register
from .ensemble import _build_member

__all__ = ["MultiLayer", "SEM", "fisher_brown"]

_AGGREGATIONS = ("std", "mean", "fisher")


def _layer_names(owner: object, layers: Any) -> list[str]:
    if layers is None:
        raise ValueError(
            f"{type(owner).__name__} needs the layers to read: pass layers=['<module>', ...] "
            "(their activations must be in Features.extras as 'layer:<module>', e.g. from "
            "oodscope.extract(model, data, layers=[...]); 'features' means the penultimate features)."
        )
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{type(owner).__name__}: layers must be a non-empty list of names, got {layers!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{type(owner).__name__}: layers lists a name twice: {names}.")
    return names


def _field(name: str) -> str:
    return "features" if name == "features" else layer_key(name)


def _layer_array(f: Features, name: str, how: str = "mean") -> np.ndarray:
    if name == "features":
        return np.asarray(f.features, dtype=np.float64)
    return pool_layer(f.extras[layer_key(name)], how)


def _layer_fields(self) -> set[str]:
    try:
        return {_field(n) for n in _layer_names(self, self.layers)}
    except ValueError:
        return {ANY_LAYER}


# ------------------------------------------------------------------ aggregation
def _ecdf_p(stat_sorted: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Left-tail p-values of ID scores ``s`` against sorted calibration scores (low score =
    small p), interpolated as oodeel does and floored at ``1/(n + 2)``. The two end points
    added beyond the calibration range lie one range (or, for constant scores, one score
    magnitude) away, so the p-values do not depend on the scores' units."""
    n = len(stat_sorted)
    lo, hi = float(stat_sorted[0]), float(stat_sorted[-1])
    spread = hi - lo if hi > lo else (max(abs(lo), abs(hi)) or 1.0)
    xs = np.concatenate([[lo - spread], stat_sorted, [hi + spread]])
    ys = np.arange(1, n + 3) / (n + 2)
    return np.interp(s, xs, ys)


def fisher_brown(p: np.ndarray, mu: float, sigma2: float) -> np.ndarray:
    """log of Brown's corrected combined p-value of per-layer p-values ``p`` (N, L): Fisher's
    ``τ = −2 Σ log p`` is referred to ``c·χ²(k')`` with ``c = σ²/(2μ)``, ``k' = 2μ²/σ²``
    (``μ, σ²`` of ``τ`` on ID calibration data)."""
    tau = -2.0 * np.log(p).sum(axis=1)
    c = sigma2 / (2.0 * mu)
    k = 2.0 * mu**2 / sigma2
    return stats.chi2.logsf(tau / c, k)


def _member_spec(spec: Any) -> Detector:
    return _build_member(spec, "MultiLayer: detector")


@register("multilayer", "multi_layer")
class MultiLayer(Detector):
    """Any feature-space detector applied to several layers, scores aggregated (oodeel).

    ``fit`` fits one copy of ``detector`` per layer of ``layers`` on (1 − ``calibration_fraction``)
    of the training data and scores the held-out rest to calibrate the aggregation:

    * ``"std"`` (oodeel's default for several layers): each layer's score divided by the
      standard deviation of its calibration scores, then averaged;
    * ``"mean"``: divided by the absolute mean of its calibration scores, then averaged
      (oodeel divides its OOD scores by their mean; with the absolute value the ordering
      survives negative ID scores such as ``−d²``);
    * ``"fisher"``: per-layer p-values from the calibration ECDF, combined by Fisher's method
      with Brown's correction for correlated layers (Haroush et al., ICLR 2022); the score is
      the log of the combined p-value.

    The member must read only features (and labels at fit): each layer is handed to it as
    ``Features(features=<that layer>, labels=...)``. Deviation: oodeel calibrates on (part of)
    the fit data itself; a held-out split is used here because a detector scored on its own
    training data is optimistic (a KNN sample is its own neighbour).
    """

    requires = InstanceNeeds({ANY_LAYER}, _layer_fields)
    fit_fields = frozenset({ANY_LAYER, "labels"})
    fit_requirements = InstanceNeedsMethod(
        {ANY_LAYER, "labels"},
        lambda self: _layer_fields(self) | ({"labels"} if self._member_needs_labels() else set()),
    )
    all_requirements = InstanceNeedsMethod(
        {ANY_LAYER, "labels"},
        lambda self: _layer_fields(self) | ({"labels"} if self._member_needs_labels() else set()),
    )
    search_space: ClassVar[dict[str, list[Any]]] = {"aggregation": list(_AGGREGATIONS)}
    score_params = frozenset({"aggregation"})
    reference = (
        "Multi-layer aggregation as in oodeel (DEEL): std/mean-normalised averaging, and "
        "Fisher's method with Brown's correction (Haroush et al., A Statistical Framework for "
        "Efficient Out of Distribution Detection in Deep Neural Networks, ICLR 2022; Dadalto et "
        "al., Combine and Conquer, 2024)"
    )

    def __init__(self, detector: Any = "mahalanobis", layers: Sequence[str] | None = None,
                 aggregation: str = "std", calibration_fraction: float = 0.2, random_state: int = 0):
        store_params(self, locals())

    def _member_needs_labels(self) -> bool:
        try:
            return "labels" in _member_spec(self.detector).fit_requirements()
        except ValueError:
            return True

    def _check_params(self) -> None:
        _layer_names(self, self.layers)
        member = _member_spec(self.detector)
        extra = set(member.requires) | set(member.fit_requirements())
        if not extra <= {"features", "labels"}:
            raise ValueError(
                f"MultiLayer needs a feature-space detector (reading only features, and labels at "
                f"fit); {type(member).name!r} needs {sorted(extra)}."
            )
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(f"MultiLayer: aggregation must be one of {list(_AGGREGATIONS)}, got {self.aggregation!r}.")
        f = self.calibration_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < f < 1.0:
            raise ValueError(f"MultiLayer: calibration_fraction must be in (0, 1), got {f!r}.")

    def _views(self, f: Features) -> list[Features]:
        labels = f.labels
        return [Features(features=_layer_array(f, n).astype(np.float32), labels=labels)
                for n in _layer_names(self, self.layers)]

    def _fit(self, train: Features) -> None:
        n = len(train)
        n_cal = int(round(n * float(self.calibration_fraction)))
        if n < 10 or n_cal < 2 or n - n_cal < 2:
            fit_rows = cal_rows = np.arange(n)  # too small to split: calibration is optimistic
        else:
            perm = np.random.default_rng(self.random_state).permutation(n)
            cal_rows, fit_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        members, calib = [], []
        for view in self._views(train):
            m = _member_spec(self.detector)
            m.fit(view[fit_rows] if m.fit_requirements() else None)
            members.append(m)
            calib.append(np.sort(m.score(view[cal_rows])))
        self.members_ = members
        self.calibration_sorted_ = calib
        self.calibration_std_ = np.array([_safe_scale(np.std(c), c) for c in calib])
        self.calibration_absmean_ = np.array([_safe_scale(abs(np.mean(c)), c) for c in calib])
        p = np.column_stack([_ecdf_p(c, c) for c in calib])
        tau = -2.0 * np.log(p).sum(axis=1)
        mu, var = float(tau.mean()), float(tau.var())
        self.fisher_mu_ = mu
        self.fisher_sigma2_ = var if var > 1e-12 * max(mu * mu, 1.0) else max(2.0 * mu, 1e-12)

    def layer_scores(self, x: Features) -> np.ndarray:
        """(N, L) raw score of each layer's member."""
        return np.column_stack([m.score(v) for m, v in zip(self.members_, self._views(x))])

    def _score(self, x: Features) -> np.ndarray:
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(f"MultiLayer: aggregation must be one of {list(_AGGREGATIONS)}, got {self.aggregation!r}.")
        s = self.layer_scores(x)
        if self.aggregation == "std":
            return (s / self.calibration_std_).mean(axis=1)
        if self.aggregation == "mean":
            return (s / self.calibration_absmean_).mean(axis=1)
        p = np.column_stack([_ecdf_p(c, s[:, j]) for j, c in enumerate(self.calibration_sorted_)])
        return fisher_brown(p, self.fisher_mu_, self.fisher_sigma2_)


def _safe_scale(value: float, scores: np.ndarray) -> float:
    floor = 1e-12 * max(float(np.max(np.abs(scores))), 1.0)
    return float(value) if value > floor else 1.0


# ------------------------------------------------------------------ SEM
class _TiedGMM:
    """Fit helper: PCA (optional) then a tied-covariance Gaussian mixture; returns arrays."""

    @staticmethod
    def fit(x: np.ndarray, n_components: int, dim: int | None, shrinkage: float, seed: int) -> dict:
        from sklearn.mixture import GaussianMixture

        mean = x.mean(axis=0)
        centred = x - mean
        if dim is not None and dim < x.shape[1]:
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            proj = vt[:dim].T
        else:
            proj = np.eye(x.shape[1])
        z = centred @ proj
        # EM in units of the data's overall spread: sklearn's reg_covar and tolerances are
        # absolute, so features in units of 1e-30 would otherwise drown in the regulariser
        spread = float(np.sqrt(np.mean(np.var(z, axis=0))))
        spread = spread if spread > 0 else 1.0
        z = z / spread
        k = max(1, min(int(n_components), len(np.unique(z, axis=0))))
        gm = GaussianMixture(n_components=k, covariance_type="tied", random_state=seed, reg_covar=1e-6).fit(z)
        precision = shrunk_covariance_inverse(gm.covariances_, shrinkage)
        return {"mean": mean, "proj": proj / spread, "means": gm.means_, "log_weights": np.log(gm.weights_),
                "whiten": whitening_from_precision(precision)}

    @staticmethod
    def log_density(x: np.ndarray, p: dict) -> np.ndarray:
        """``log Σ_k π_k exp(−½ (z − m_k)ᵀ P (z − m_k))`` (unnormalised, as in the authors' code)."""
        a = ((x - p["mean"]) @ p["proj"]) @ p["whiten"]
        m = p["means"] @ p["whiten"]
        d = np.einsum("ij,ij->i", a, a)[:, None] - 2.0 * a @ m.T + np.einsum("ij,ij->i", m, m)[None, :]
        return logsumexp(p["log_weights"][None, :] - 0.5 * np.maximum(d, 0.0), axis=1)


def _sem_fields(self) -> set[str]:
    try:
        return {"features", layer_key(_layer_names(self, self.layers)[0])}
    except ValueError:
        return {"features", ANY_LAYER}


@register("sem")
class SEM(Detector):
    """SEM: semantics score for full-spectrum OOD detection (Yang, Zhou & Liu, IJCV 2023).

    ``SEM(x) = log p_high(x) − λ · log p_low(x)``: ``p_high`` is a tied-covariance Gaussian
    mixture on the (PCA-reduced) penultimate features, which carry semantics *and* style;
    ``p_low`` one on the low-level feature statistics of an early layer — per-channel mean
    and variance of its map — which carry style only. Subtracting the low-level part leaves
    the semantic evidence, so covariate-shifted ID images keep high scores while semantic
    shift is detected. Densities are the unnormalised mixtures ``Σ_k π_k exp(−½ d_k²)`` of the
    authors' code (OpenOOD ``gmm`` postprocessor, which scores ``α · log p`` per layer); the
    defaults follow its SEM configurations (``gmm_iter/cifar_gmm_*``): 10 components on a
    50-D PCA of the penultimate features, 3 components on the low-level statistics (PCA to 50
    dimensions there only for ResNet's 128 statistics; ``low_dim`` offers it), λ = 1e-4, with
    the sweep 0 … 1 over the λ values its configurations use. Their ``log(p + 1e-40)`` floor
    is not applied (log-sum-exp keeps far samples apart instead of flooring them all at −92).

    ``layers[0]`` names the low-level layer (``Features.extras["layer:<name>"]``; a 4-D map
    is pooled to per-channel mean and variance, a 2-D array is taken as the statistics).
    """

    requires = InstanceNeeds({"features", ANY_LAYER}, _sem_fields)
    fit_fields = frozenset({"features", ANY_LAYER})
    fit_requirements = InstanceNeedsMethod({"features", ANY_LAYER}, _sem_fields)
    all_requirements = InstanceNeedsMethod({"features", ANY_LAYER}, _sem_fields)
    search_space: ClassVar[dict[str, list[Any]]] = {"low_weight": [0.0, 1e-6, 1e-4, 1e-2, 1.0]}
    score_params = frozenset({"low_weight"})
    min_fit_samples = 4
    reference = (
        "Yang, Zhou & Liu, Full-Spectrum Out-of-Distribution Detection (SEM score), IJCV 2023"
    )

    def __init__(self, layers: Sequence[str] | None = None, low_weight: float = 1e-4,
                 high_components: int = 10, low_components: int = 3, high_dim: int | None = 50,
                 low_dim: int | None = None, shrinkage: float = 1e-3, max_fit_samples: int | None = 20000,
                 random_state: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        _layer_names(self, self.layers)
        w = self.low_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w) or w < 0:
            raise ValueError(f"SEM: low_weight must be a finite number >= 0, got {w!r}.")
        for name in ("high_components", "low_components", "high_dim", "low_dim", "max_fit_samples"):
            v = getattr(self, name)
            if v is None and name not in ("high_components", "low_components"):
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"SEM: {name} must be an integer >= 1, got {v!r}.")
        if not (isinstance(self.shrinkage, numbers.Real) and 0.0 <= self.shrinkage < 1.0):
            raise ValueError(f"SEM: shrinkage must be in [0, 1), got {self.shrinkage!r}.")

    def _low(self, f: Features) -> np.ndarray:
        return _layer_array(f, _layer_names(self, self.layers)[0], "stat")

    def _fit(self, train: Features) -> None:
        rows = np.arange(len(train))
        if self.max_fit_samples is not None and len(train) > int(self.max_fit_samples):
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.permutation(len(train))[: int(self.max_fit_samples)])
        sub = train[rows]
        high = np.asarray(sub.features, dtype=np.float64)
        self.high_gmm_ = _TiedGMM.fit(high, self.high_components, self.high_dim, self.shrinkage, self.random_state)
        self.low_gmm_ = _TiedGMM.fit(self._low(sub), self.low_components, self.low_dim, self.shrinkage,
                                     self.random_state)

    def log_densities(self, x: Features) -> tuple[np.ndarray, np.ndarray]:
        """``(log p_high, log p_low)`` per sample."""
        high = _TiedGMM.log_density(np.asarray(x.features, dtype=np.float64), self.high_gmm_)
        return high, _TiedGMM.log_density(self._low(x), self.low_gmm_)

    def _score(self, x: Features) -> np.ndarray:
        high, low = self.log_densities(x)
        return high - float(self.low_weight) * low
