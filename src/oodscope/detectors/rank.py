"""Rank-1 removal detectors (Song, Sebe & Wang): RankFeat on feature maps, RankWeight on the
weights of one deep layer. Both re-run the network on the raw inputs (``extras["inputs"]``,
stored by ``extract(..., keep_inputs=True)``) and score with the energy of the new logits.

The network is never modified: RankFeat replaces a module's output through a forward hook,
RankWeight evaluates the model with one substituted weight tensor (``torch.func``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from .._numeric import logsumexp
from ..features import Features
from ._network import (
    ANY_LAYER,
    InstanceNeeds,
    InstanceNeedsMethod,
    capture_outputs,
    check_model,
    eval_mode,
    float_inputs,
    forward_logits,
    head_of,
    input_batches,
    resolve_modules,
    stage_outputs,
)
from .base import Detector, register

__all__ = ["RankFeat", "RankWeight", "remove_rank1"]

_REFERENCE = (
    "Song, Sebe & Wang, RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection, "
    "NeurIPS 2022; RankFeat&RankWeight, IEEE TPAMI 47(4), 2025"
)


def remove_rank1(t):
    """``M − σ₁ u₁ v₁ᵀ`` for every sample's matrix ``M`` (torch, float64 SVD).

    A 4-D map ``(N, C, H, W)`` is the ``C × HW`` matrix of each sample, a 3-D ``(N, T, D)``
    token tensor the ``T × D`` one."""
    import torch

    if t.ndim not in (3, 4):
        raise ValueError(
            f"RankFeat removes the dominant singular component of per-sample feature matrices, "
            f"so the layer must output (N, C, H, W) maps or (N, T, D) tokens; got shape {tuple(t.shape)}."
        )
    m = t.reshape(t.shape[0], t.shape[1], -1).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    top = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    return (m - top).reshape(t.shape).to(t.dtype)


def _energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    t = float(temperature)
    return t * logsumexp(np.asarray(logits, dtype=np.float64) / t, axis=1)


class _Rerun(Detector):
    """Shared parameters and checks of the detectors that run the network on the inputs."""

    fit_fields = None

    def __init__(self, model: Any = None, temperature: float = 1.0, batch_size: int = 128):
        self.model = model
        self.temperature = temperature
        self.batch_size = batch_size

    def _check_params(self) -> None:
        check_model(self, self.model)
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {self.temperature}.")
        if int(self.batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {self.batch_size}.")


@register("rankfeat")
class RankFeat(_Rerun):
    """RankFeat: remove the rank-1 component ``σ₁u₁v₁ᵀ`` of each sample's high-level feature
    matrix, finish the forward pass and score with the energy ``T·logsumexp(f/T)``.

    ``layers`` names the modules whose output is modified (one forward pass each; the logits
    of the passes are averaged, the paper's "Block 3 + Block 4" fusion). By default the last
    stage of the network is used (the output of the last module at the smallest spatial
    resolution, see `oodscope.detectors._network.stage_outputs`: ``layer4`` of a ResNet,
    the paper's "Block 4"). Needs layers with feature maps or tokens, so the class-level
    requirement lists ``"layer:*"``; an instance needs only the model and the inputs.
    """

    requires = InstanceNeeds({"model", "inputs", ANY_LAYER}, lambda self: {"model", "inputs"})
    all_requirements = InstanceNeedsMethod({"model", "inputs", ANY_LAYER}, lambda self: {"model", "inputs"})
    reference = _REFERENCE

    def __init__(self, model: Any = None, layers: Sequence[str] | None = None,
                 temperature: float = 1.0, batch_size: int = 128):
        super().__init__(model, temperature, batch_size)
        self.layers = layers

    def _layer_names(self, example) -> list[str]:
        if self.layers is not None:
            names = [self.layers] if isinstance(self.layers, str) else list(self.layers)
            if not names:
                raise ValueError("RankFeat: layers is empty; name at least one module or pass None.")
            return names
        stages = stage_outputs(self.model, example)
        if not stages:
            raise ValueError(
                "RankFeat found no layer with (N, C, H, W) feature maps in this network; name a "
                "module with map or token outputs via layers=[...]."
            )
        return stages[-1:]

    def _score(self, x: Features) -> np.ndarray:
        import torch

        inputs = float_inputs(self, x)
        out = np.empty(len(inputs))
        model = self.model
        with eval_mode(model), torch.no_grad():
            names = None
            for rows, xt in input_batches(inputs, self.batch_size, model):
                if names is None:
                    names = self._layer_names(xt[:1])
                    modules = resolve_modules(self, model, names)
                total = 0.0
                for name in names:
                    with capture_outputs({name: modules[name]}, replace=lambda n, o: remove_rank1(o)):
                        total = total + forward_logits(model, xt).double()
                logits = (total / len(names)).cpu().numpy()
                out[rows] = _energy(logits, self.temperature)
        return out


def _default_weight_layer(model) -> str:
    """The last Conv/Linear module registered before the head (the head itself if none)."""
    import torch

    head_name, _ = head_of(model, model)
    candidates = [n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))
                  and n != head_name]
    return candidates[-1] if candidates else head_name


@register("rankweight")
class RankWeight(_Rerun):
    """RankWeight: remove the rank-1 component of one deep layer's weight and score with the
    energy of the resulting network.

    The weight of ``layer`` (``C_out × C_in × k…``, seen as the matrix ``C_out × (C_in·k…)``)
    becomes ``W − σ₁u₁v₁ᵀ``, computed once per scoring call. By default the layer is the last
    convolution/linear layer before the classifier head (the head itself in a network that has
    no other), the "single deep layer" of the paper (the last block's convolutions of a
    ResNet). The original model is left untouched.
    """

    requires = frozenset({"model", "inputs"})
    reference = _REFERENCE

    def __init__(self, model: Any = None, layer: str | None = None, temperature: float = 1.0,
                 batch_size: int = 128):
        super().__init__(model, temperature, batch_size)
        self.layer = layer

    def layer_name(self) -> str:
        return self.layer if self.layer is not None else _default_weight_layer(self.model)

    def modified_weight(self):
        import torch

        name = self.layer_name()
        module = resolve_modules(self, self.model, [name])[name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            raise ValueError(f"RankWeight: module {name!r} has no weight matrix (got {type(weight).__name__}).")
        w = weight.detach().double().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w = w - s[0] * torch.outer(u[:, 0], vh[0])
        return f"{name}.weight", w.reshape(weight.shape).to(weight.dtype)

    def _score(self, x: Features) -> np.ndarray:
        import torch
        from torch.func import functional_call

        inputs = float_inputs(self, x)
        out = np.empty(len(inputs))
        model = self.model
        key, weight = self.modified_weight()
        params = {**dict(model.named_parameters()), **dict(model.named_buffers()), key: weight}
        with eval_mode(model), torch.no_grad():
            for rows, xt in input_batches(inputs, self.batch_size, model):
                from ..extraction import _split_output

                logits = _split_output(functional_call(model, params, (xt,)))["logits"]
                out[rows] = _energy(logits.double().cpu().numpy(), self.temperature)
        return out
