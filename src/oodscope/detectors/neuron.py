"""Detectors built on how single neurons of the penultimate layer behave: NCI and NAC-UE.

Both work from cached `Features` (penultimate features, the classifier head and the logits);
neither runs the network again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._numeric import softmax
from .._params import store_params
from ..features import Features
from ._checks import check_int, check_real
from .base import Detector, register

__all__ = ["NCI", "NACUE", "nac_thresholds"]

#: Rows per block when scoring (keeps (rows, D) float64 temporaries small).
_BLOCK = 4096


def _logits_of(x: Features, rows: slice) -> np.ndarray:
    if x.logits is not None:
        return np.asarray(x.logits[rows], dtype=np.float64)
    return np.asarray(x.logits_from_features(np.asarray(x.features[rows], dtype=np.float32)),
                      dtype=np.float64)


@register("nci")
class NCI(Detector):
    """NCI, the Neural-Collapse-inspired detector (Liu & Qin, CVPR 2025).

    ``score = w_ĉ · (h − μ_G) / ‖h − μ_G‖ + α ‖h‖₁``: the projection of the centred feature
    direction on the head row of the predicted class ``ĉ`` (ID features collapse towards their
    class's weight vector once centred on the global training mean ``μ_G``) plus an L1 feature
    norm filter (ID features lie farther from the origin). As in the authors' code (their
    OpenOOD postprocessor), the weight row is not normalised; a sample at ``μ_G`` exactly gets
    projection 0.
    """

    requires = frozenset({"features", "head"})
    fit_fields = frozenset({"features"})
    search_space: ClassVar[dict[str, list[Any]]] = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]}
    score_params = frozenset({"alpha"})
    reference = (
        "Liu & Qin, Detecting Out-of-Distribution through the Lens of Neural Collapse (NCI), "
        "CVPR 2025"
    )

    def __init__(self, alpha: float = 1e-4):
        self.alpha = alpha

    def _check_params(self) -> None:
        check_real(self, "alpha", self.alpha)

    def _fit(self, train: Features) -> None:
        self.train_mean_ = np.mean(train.features, axis=0, dtype=np.float64)

    def _score(self, x: Features) -> np.ndarray:
        check_real(self, "alpha", self.alpha)
        w = np.asarray(x.head_weight, dtype=np.float64)
        out = np.empty(len(x))
        for start in range(0, len(x), _BLOCK):
            rows = slice(start, start + _BLOCK)
            h = np.asarray(x.features[rows], dtype=np.float64)
            pred = _logits_of(x, rows).argmax(axis=1)
            centred = h - self.train_mean_
            norm = np.linalg.norm(centred, axis=1)
            proj = np.einsum("ij,ij->i", w[pred], centred)
            proj = np.divide(proj, norm, out=np.zeros_like(proj), where=norm > 0)
            out[rows] = proj + float(self.alpha) * np.abs(h).sum(axis=1)
        return out


def nac_thresholds(bins: int, base: float = 1e3) -> np.ndarray:
    """The ``bins`` interval edges NAC uses for neuron states in [0, 1]: log-spaced towards
    both ends (fine near 0 and near 1, where sigmoid states pile up), last inner edge 1.01
    and a final edge 1.2, so ``bins - 1`` intervals cover every state."""
    half = bins // 2
    x = np.linspace(1.0, np.sqrt(base), num=half)
    left = np.log(x) / np.log(base)
    right = (1.0 - left)[::-1]
    edges = np.concatenate([left[:-1], right])
    edges[-1] += 1e-2
    return np.append(edges, 1.2)


@register("nac_ue", "nac")
class NACUE(Detector):
    """NAC-UE: Neuron Activation Coverage for uncertainty estimation (Liu et al., ICLR 2024).

    A neuron's state is ``ẑ = sigmoid(β · z ⊙ ∂KL(u ‖ softmax(f))/∂z)``: its activation times
    the gradient of the KL divergence between the uniform distribution and the prediction,
    which for the penultimate layer (input of the head ``W``) has the closed form
    ``∂/∂z = Wᵀ(p − 1/C)``. ``fit`` histograms the states of every neuron over a
    class-balanced subset of ``n_samples`` training samples (``bins`` log-spaced edges, see
    `nac_thresholds`); a bin's coverage is ``min(count / min_count, 1)``. A sample's score is
    the mean, over neurons, of the coverage of the bin its state falls in (higher = the
    training data visited that state = in-distribution).

    Defaults are the authors' CIFAR-10 setting, which uses this layer alone (``avgpool`` of a
    ResNet-18: M=50, O=50, β=100, 1000 training images). Their multi-layer ImageNet variant
    needs gradients at inner layers and is not implemented here.
    """

    requires = frozenset({"features", "head"})
    fit_fields = frozenset({"features", "head", "labels"})
    search_space: ClassVar[dict[str, list[Any]]] = {"min_count": [10, 20, 50]}
    score_params = frozenset({"min_count"})
    reference = (
        "Liu et al., Neuron Activation Coverage: Rethinking Out-of-distribution Detection and "
        "Generalization (NAC-UE), ICLR 2024"
    )

    def __init__(self, steepness: float = 100.0, bins: int = 50, min_count: int = 50,
                 n_samples: int | None = 1000, random_state: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_real(self, "steepness", self.steepness, strict=True)
        check_int(self, "bins", self.bins, low=4)
        if int(self.bins) % 2:
            raise ValueError(f"NACUE: bins must be even (edges are mirrored around 0.5), got {self.bins}.")
        check_int(self, "min_count", self.min_count)
        if self.n_samples is not None:
            check_int(self, "n_samples", self.n_samples)

    def states(self, x: Features) -> np.ndarray:
        """(N, D) neuron states ``sigmoid(β · h ⊙ Wᵀ(p − 1/C))`` in float64."""
        w = np.asarray(x.head_weight, dtype=np.float64)
        c = w.shape[0]
        out = np.empty(x.features.shape, dtype=np.float64)
        for start in range(0, len(x), _BLOCK):
            rows = slice(start, start + _BLOCK)
            h = np.asarray(x.features[rows], dtype=np.float64)
            grad = (softmax(_logits_of(x, rows), axis=1) - 1.0 / c) @ w
            # sigmoid via tanh: no overflow warnings for large |β z g|
            out[rows] = 0.5 * (1.0 + np.tanh(0.5 * float(self.steepness) * h * grad))
        return out

    def _subset(self, labels: np.ndarray) -> np.ndarray:
        """Class-balanced sample of the training rows (all rows when ``n_samples`` is None)."""
        n = len(labels)
        if self.n_samples is None or int(self.n_samples) >= n:
            return np.arange(n)
        classes, counts = np.unique(labels, return_counts=True)
        per_class = max(1, min(int(self.n_samples) // len(classes), int(counts.min())))
        rng = np.random.default_rng(self.random_state)
        picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
        return np.sort(np.concatenate(picked))

    def _fit(self, train: Features) -> None:
        rows = self._subset(train.labels)
        states = self.states(train[rows])
        edges = nac_thresholds(int(self.bins))
        bins = np.clip(np.searchsorted(edges, states, side="right") - 1, 0, len(edges) - 2)
        d = states.shape[1]
        flat = (bins * d + np.arange(d)).reshape(-1)
        counts = np.bincount(flat, minlength=(len(edges) - 1) * d).reshape(len(edges) - 1, d)
        self.edges_ = edges
        self.counts_ = counts
        self.n_fit_samples_ = int(len(rows))

    def _score(self, x: Features) -> np.ndarray:
        check_int(self, "min_count", self.min_count)
        coverage = np.minimum(self.counts_ / float(self.min_count), 1.0)
        states = self.states(x)
        bins = np.clip(np.searchsorted(self.edges_, states, side="right") - 1, 0, len(self.edges_) - 2)
        return coverage[bins, np.arange(states.shape[1])].mean(axis=1)
