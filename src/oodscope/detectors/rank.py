"""Rank-1 removal detectors (Song, Sebe & Wang): RankFeat on feature maps, RankWeight on the
weights of deep layers. Both re-run the network on the raw inputs (``extras["inputs"]``,
stored by ``extract(..., keep_inputs=True)``) and score with the energy of the new logits.

The network is never modified: RankFeat replaces a module's output through a forward hook,
RankWeight evaluates the model with substituted weight tensors (``torch.func``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._numeric import logsumexp
from .._params import store_params
from ..features import Features
from ._checks import check_int, check_real, refuse_unresolved_scores
from ._network import (ANY_LAYER, InstanceNeeds, InstanceNeedsMethod, capture_outputs, check_model,
                       eval_mode, float_inputs, forward_logits, head_of, input_batches,
                       resolve_modules, stage_outputs, torch_single_thread)
from .base import Detector, register

__all__ = ["RankFeat", "RankWeight", "remove_rank1"]

_REFERENCE = (
    "Song, Sebe & Wang, RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection, "
    "NeurIPS 2022; RankFeat&RankWeight: Rank-1 Feature/Weight Removal for OOD Detection, "
    "IEEE TPAMI 2025"
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
    with torch_single_thread():
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    top = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    return (m - top).reshape(t.shape).to(t.dtype)


def _energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    t = float(temperature)
    return t * logsumexp(np.asarray(logits, dtype=np.float64) / t, axis=1)


def _names(owner: object, layers: str | Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{type(owner).__name__}: layers must be module names (or None), got {layers!r}.")
    return names


class _Rerun(Detector):
    """Shared parameters and checks of the rank-1 detectors (they run the network)."""

    fit_fields = None

    def __init__(self, model: Any = None, layers: str | Sequence[str] | None = None,
                 temperature: float = 1.0, batch_size: int = 128):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_model(self, self.model)
        _names(self, self.layers)
        check_real(self, "temperature", self.temperature, strict=True)
        check_int(self, "batch_size", self.batch_size)

    def _refuse_saturated(self, scores: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        refuse_unresolved_scores(type(self).__name__, scores, inputs, "extras['inputs']")
        return scores


@register("rankfeat")
class RankFeat(_Rerun):
    """RankFeat: remove the rank-1 component ``σ₁u₁v₁ᵀ`` of each sample's high-level feature
    matrix, finish the forward pass and score with the energy ``T·logsumexp(f/T)``.

    ``layers`` names the modules whose output is modified, one forward pass per module with
    only that module changed; the logits of the passes are averaged (the authors' "Block 3 +
    Block 4" fusion in the logit space). By default the last two stages of the network
    (`oodscope.detectors._network.stage_outputs`: ``layer3`` and ``layer4`` of a ResNet), as
    in the authors' code and OpenOOD; ``layers=["layer4"]`` is the paper's single-block
    RankFeat. The exact SVD is used (the authors' power iteration is only a speed-up).

    The network must have layers with feature maps or tokens, so the class-level requirement
    lists ``"layer:*"`` (the synthetic test problem's MLP has none); an instance needs only the
    model and the inputs.
    """

    requires = InstanceNeeds({"model", "inputs", ANY_LAYER}, lambda self: {"model", "inputs"})
    all_requirements = InstanceNeedsMethod({"model", "inputs", ANY_LAYER}, lambda self: {"model", "inputs"})
    reference = _REFERENCE

    def _layer_names(self, example) -> list[str]:
        names = _names(self, self.layers)
        if names is not None:
            return names
        stages = stage_outputs(self.model, example)
        if not stages:
            raise ValueError(
                "RankFeat found no layer with (N, C, H, W) feature maps in this network; name a "
                "module with map or token outputs via layers=[...]."
            )
        return stages[-2:]

    def _score(self, x: Features) -> np.ndarray:
        import torch

        inputs = float_inputs(self, x)
        out = np.empty(len(inputs))
        model = self.model
        names = modules = None
        with eval_mode(model), torch.no_grad():
            for rows, xt in input_batches(inputs, self.batch_size, model):
                if names is None:
                    names = self._layer_names(xt[:1])
                    modules = resolve_modules(self, model, names)
                total = 0.0
                for name in names:
                    with capture_outputs({name: modules[name]}, replace=lambda n, o: remove_rank1(o)):
                        total = total + forward_logits(model, xt).double()
                out[rows] = _energy((total / len(names)).cpu().numpy(), self.temperature)
        return self._refuse_saturated(out, inputs)


def _default_weight_layer(owner: object, model) -> str:
    """The last Conv/Linear module registered before the head (the head itself if none)."""
    import torch

    head_name, _ = head_of(owner, model)
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    candidates = [n for n, m in model.named_modules() if isinstance(m, kinds) and n != head_name]
    return candidates[-1] if candidates else head_name


@register("rankweight")
class RankWeight(_Rerun):
    """RankWeight: remove the rank-1 component of deep layers' weights and score with the
    energy of the resulting network.

    The weight of each module in ``layers`` (``C_out × C_in × k…``, seen as the matrix
    ``C_out × (C_in·k…)``) becomes ``W − σ₁u₁v₁ᵀ`` (exact SVD, recomputed at every scoring call,
    the model is left untouched). By default the last convolution/linear layer before the
    classifier head (the head itself in a network that has no other): the paper's "single deep
    layer"; the authors' ResNet code edits the 1×1 and 3×3 convolutions of the last block,
    i.e. ``layers=["layer4.2.conv2", "layer4.2.conv3"]``.
    """

    requires = frozenset({"model", "inputs"})
    reference = _REFERENCE
    sign_test_exempt = (
        "the synthetic problem's network has no layer but its head, whose rank-1 removal is "
        "not the method; tests/test_detectors_posthoc.py checks the sign on a CNN"
    )

    def layer_names(self) -> list[str]:
        names = _names(self, self.layers)
        return names if names is not None else [_default_weight_layer(self, self.model)]

    def modified_weights(self) -> dict[str, Any]:
        """``{"<module>.weight": W − σ₁u₁v₁ᵀ}`` for every module in `layer_names`."""
        import torch

        names = self.layer_names()
        out = {}
        for name, module in resolve_modules(self, self.model, names).items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
                raise ValueError(f"RankWeight: module {name!r} has no weight matrix (got {type(weight).__name__}).")
            w = weight.detach().double().reshape(weight.shape[0], -1)
            with torch_single_thread():
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
            w = w - s[0] * torch.outer(u[:, 0], vh[0])
            out[f"{name}.weight"] = w.reshape(weight.shape).to(weight.dtype)
        return out

    def _score(self, x: Features) -> np.ndarray:
        import torch
        from torch.func import functional_call

        inputs = float_inputs(self, x)
        out = np.empty(len(inputs))
        model = self.model
        params = {**dict(model.named_parameters()), **dict(model.named_buffers()), **self.modified_weights()}
        with eval_mode(model), torch.no_grad():
            for rows, xt in input_batches(inputs, self.batch_size, model):
                logits = forward_logits(lambda t: functional_call(model, params, (t,)), xt)
                out[rows] = _energy(logits.double().cpu().numpy(), self.temperature)
        return self._refuse_saturated(out, inputs)
