"""MDSEns: Lee et al.'s full Mahalanobis method — class-conditional Gaussians on several
layers, input pre-processing towards the closest class, and a weighted sum over layers.

The network runs again on the raw inputs: once over the training inputs to fit the layer
Gaussians (streamed, float64), and at scoring one forward pass (``epsilon = 0``) or, per
layer, a forward/backward pass for the input gradient plus a forward pass of the perturbed
input.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from .._numeric import shrunk_covariance_inverse
from .._params import store_params
from ..features import Features
from ._checks import check_int, check_real, refuse_unresolved_scores
from ._network import (capture_head_input, capture_outputs, check_model, eval_mode, float_inputs,
                       forward_logits, head_of, input_batches, resolve_modules, stage_outputs,
                       torch_pool)
from ._stats import ScatterAccumulator, whitening_from_precision
from .base import Detector, register

__all__ = ["MDSEnsemble", "PENULTIMATE"]

#: Layer name standing for the input of the classifier head (the penultimate features).
PENULTIMATE = "<head input>"


def _mahalanobis_max(f, means, whiten):
    """``max_c −½ (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)`` and the arg-max class (torch, differentiable)."""
    a = f @ whiten
    m = means @ whiten
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ m.T + (m * m).sum(1)[None, :]
    best = d.min(dim=1)
    return -0.5 * best.values, best.indices


@register("mdsens", "mahalanobis_ensemble")
class MDSEnsemble(Detector):
    """Mahalanobis with input pre-processing and a feature ensemble (Lee et al., NeurIPS 2018).

    For every layer ``ℓ`` the spatially averaged activations ``f_ℓ(x)`` get class means
    ``μ_ℓc`` and one shared covariance (within-class scatter / N, inverted with the library's
    scale-relative shrinkage). Layer score: ``M_ℓ(x) = max_c −½ (f_ℓ(x̃) − μ_ℓc)ᵀ Σ_ℓ⁻¹ (…)``
    at the pre-processed input ``x̃ = x − ε · sign(∇ₓ ½ d²_ℓĉ(x)) / std`` that moves towards the
    closest class ``ĉ`` (``std`` the input normalisation, as for ODIN). Score:
    ``Σ_ℓ α_ℓ M_ℓ(x)``.

    ``layers``: module names whose outputs are used, plus `PENULTIMATE` for the head input;
    by default every stage output of the network (`stage_outputs`: conv1/``layer1..4`` of a
    ResNet) and the penultimate features. ``layer_weights``: the ``α_ℓ``; by default each
    layer's score is z-scored with statistics of ``n_calibration`` training samples and the
    z-scores are averaged. Deviation: Lee et al. fit ``α`` by logistic regression on
    validation OOD (or adversarial) samples; ``fit`` here sees ID data only — pass your own
    ``layer_weights`` to reproduce that. Zero-gradient input elements do not move
    (``sign(0) = 0``).
    """

    requires = frozenset({"model", "inputs"})
    fit_fields = frozenset({"inputs", "labels"})
    search_space: ClassVar[dict[str, list[Any]]] = {
        "epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01],
    }
    score_params = frozenset({"epsilon", "layer_weights"})
    reference = (
        "Lee et al., A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks (Mahalanobis with input pre-processing and feature ensemble), "
        "NeurIPS 2018"
    )

    def __init__(self, model: Any = None, layers: Sequence[str] | None = None, epsilon: float = 0.0014,
                 layer_weights: Sequence[float] | None = None, input_std: float | Sequence[float] | None = None,
                 shrinkage: float = 1e-3, n_calibration: int = 1000, batch_size: int = 128,
                 random_state: int = 0):
        store_params(self, locals())

    # ------------------------------------------------------------ checks
    def _check_params(self) -> None:
        check_model(self, self.model)
        check_real(self, "epsilon", self.epsilon)
        check_real(self, "shrinkage", self.shrinkage)
        if self.shrinkage >= 1.0:
            raise ValueError(f"MDSEnsemble: shrinkage must be in [0, 1), got {self.shrinkage!r}.")
        check_int(self, "n_calibration", self.n_calibration, low=2)
        check_int(self, "batch_size", self.batch_size)
        if self.input_std is not None:
            std = np.asarray(self.input_std, dtype=np.float64)
            if std.ndim > 1 or not np.all(std > 0):
                raise ValueError(f"MDSEnsemble: input_std must be positive (per channel), got {self.input_std!r}.")
        if self.layers is not None and (isinstance(self.layers, str) or len(self.layers) == 0):
            raise ValueError("MDSEnsemble: layers must be a non-empty list of module names (or None).")

    def _weights(self) -> np.ndarray:
        n = len(self.layers_)
        if self.layer_weights is None:
            return np.full(n, 1.0 / n)
        w = np.asarray(self.layer_weights, dtype=np.float64).reshape(-1)
        if w.shape != (n,) or not np.all(np.isfinite(w)):
            raise ValueError(f"MDSEnsemble: layer_weights must be {n} finite numbers (one per layer {self.layers_}).")
        return w

    # ------------------------------------------------------------ network passes
    def _resolve_layers(self, example) -> list[str]:
        if self.layers is not None:
            return list(self.layers)
        return [*stage_outputs(self.model, example), PENULTIMATE]

    def _layer_features(self, xt, names):
        """Pooled activations of each named layer for one batch (torch tensors)."""
        model = self.model
        modules = resolve_modules(self, model, [n for n in names if n != PENULTIMATE])
        _, head = head_of(self, model)
        with capture_outputs(modules) as outs, capture_head_input(model, head) as cap:
            forward_logits(model, xt)
        return [torch_pool(cap["h"].reshape(len(xt), -1) if n == PENULTIMATE else outs[n])
                for n in names]

    def _std_tensor(self, xt):
        import torch

        if self.input_std is None:
            return None
        std = torch.as_tensor(np.asarray(self.input_std, dtype=np.float64), dtype=xt.dtype, device=xt.device)
        if std.ndim == 1 and xt.ndim > 2:
            std = std.reshape(1, -1, *([1] * (xt.ndim - 2)))
        return std

    # ------------------------------------------------------------ fit
    def _fit(self, train: Features) -> None:
        import torch

        inputs = float_inputs(self, train)
        labels = train.labels
        c = int(labels.max()) + 1
        names = acc = None
        with eval_mode(self.model), torch.no_grad():
            for rows, xt in input_batches(inputs, self.batch_size, self.model):
                if names is None:
                    names = self._resolve_layers(xt[:1])
                feats = self._layer_features(xt, names)
                if acc is None:
                    acc = [ScatterAccumulator(f.shape[1], c) for f in feats]
                for a, f in zip(acc, feats):
                    a.update(f.double().cpu().numpy(), labels[rows])
        classes = acc[0].present()
        self.layers_ = names
        self.classes_ = classes
        self.means_ = [a.means()[classes] for a in acc]
        self.whiten_ = [
            whitening_from_precision(shrunk_covariance_inverse(a.within_scatter() / a.total, self.shrinkage))
            for a in acc
        ]
        n = len(inputs)
        picked = np.sort(np.random.default_rng(self.random_state).permutation(n)[: int(self.n_calibration)])
        cal = self.layer_scores(inputs[picked], epsilon=0.0)
        std = cal.std(axis=0)
        self.layer_mean_ = cal.mean(axis=0)
        self.layer_std_ = np.where(std > 1e-12 * np.maximum(np.abs(cal.mean(axis=0)), 1.0), std, 1.0)

    # ------------------------------------------------------------ score
    def layer_scores(self, inputs: np.ndarray, epsilon: float | None = None) -> np.ndarray:
        """(N, L) per-layer scores ``M_ℓ`` at the pre-processed inputs."""
        import torch

        eps = float(self.epsilon if epsilon is None else epsilon)
        dev_dtype = None
        out = np.empty((len(inputs), len(self.layers_)))
        with eval_mode(self.model):
            for rows, xt in input_batches(inputs, self.batch_size, self.model):
                if dev_dtype is None:
                    dev_dtype = dict(device=xt.device, dtype=torch.float64)
                    means = [torch.as_tensor(m, **dev_dtype) for m in self.means_]
                    whiten = [torch.as_tensor(w, **dev_dtype) for w in self.whiten_]
                if eps == 0.0:
                    with torch.no_grad():
                        feats = self._layer_features(xt, self.layers_)
                    for j, f in enumerate(feats):
                        out[rows, j] = _mahalanobis_max(f.double(), means[j], whiten[j])[0].cpu().numpy()
                    continue
                std = self._std_tensor(xt)
                for j, name in enumerate(self.layers_):
                    x = xt.detach().requires_grad_(True)
                    with torch.enable_grad():
                        f = self._layer_features(x, [name])[0].double()
                        _, cls = _mahalanobis_max(f.detach(), means[j], whiten[j])
                        a = (f - means[j][cls]) @ whiten[j]
                        loss = 0.5 * (a * a).sum()
                        (grad,) = torch.autograd.grad(loss, x)
                    step = torch.sign(grad)
                    if std is not None:
                        step = step / std
                    with torch.no_grad():
                        f = self._layer_features(x.detach() - eps * step, [name])[0].double()
                        out[rows, j] = _mahalanobis_max(f, means[j], whiten[j])[0].cpu().numpy()
        return out

    def _score(self, x: Features) -> np.ndarray:
        weights = self._weights()
        inputs = float_inputs(self, x)
        scores = self.layer_scores(inputs)
        if self.layer_weights is None:
            scores = (scores - self.layer_mean_) / self.layer_std_
        scores = scores @ weights
        refuse_unresolved_scores(type(self).__name__, scores, inputs, "extras['inputs']")
        return scores
