"""Detectors that use gradients: ODIN, i-ODIN (re-run the network) and GradNorm (closed form).

ODIN and i-ODIN must run the network on perturbed inputs, so they take the model as a
constructor argument and read the raw inputs from ``extras["inputs"]`` (stored by
``oodscope.extract(..., keep_inputs=True)``). GradNorm only needs the gradient with respect
to the last layer's weights, which has a closed form in the cached logits and features, so
it never touches the network.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._numeric import softmax
from .._params import store_params
from ..features import Features
from ._checks import refuse_unresolved_scores
from .base import Detector, register

__all__ = ["ODIN", "IODIN", "GradNorm"]


def _model_device_dtype(model) -> tuple[Any, Any]:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class _PerturbedSoftmax(Detector):
    """Shared machinery: one backward pass for the input gradient, one forward for the score.

    Score = max softmax(f(x̃)/T) with x̃ = x − ε·step, where ``step`` is built from the
    gradient of the cross-entropy of the temperature-scaled logits against the predicted
    class (subclasses decide which input elements move).
    """

    requires = frozenset({"model", "inputs"})
    fit_fields = None

    def __init__(
        self,
        model: Any = None,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        input_std: float | Sequence[float] | None = None,
        batch_size: int = 128,
    ):
        store_params(self, locals())

    def _check_params(self) -> None:
        import torch

        if not isinstance(self.model, torch.nn.Module):
            raise ValueError(
                f"{type(self).__name__} needs the network: pass model=<torch.nn.Module> "
                f"(got {type(self.model).__name__})."
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon}.")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.input_std is not None:
            std = np.asarray(self.input_std, dtype=np.float64)
            if std.ndim > 1 or not np.all(std > 0):
                raise ValueError(
                    "input_std must be a positive number or a per-channel list of positive "
                    f"numbers, got {self.input_std!r}."
                )

    def _step(self, grad):
        """Per-element step (same shape as the input) before scaling by ε."""
        raise NotImplementedError

    def _score(self, x: Features) -> np.ndarray:
        import torch

        from .._outputs import output_tensors

        inputs = x.extras["inputs"]
        if inputs.dtype.kind != "f":
            raise ValueError(
                f"{type(self).__name__} perturbs the inputs along their gradient, so they must "
                f"be floating point; extras['inputs'] has dtype {inputs.dtype} (token ids?)."
            )
        model = self.model
        device, dtype = _model_device_dtype(model)
        std = None
        if self.input_std is not None:
            # ε is in raw pixel units; divide by the normalisation std (per channel) as ODIN does
            std = torch.as_tensor(np.asarray(self.input_std, dtype=np.float64), dtype=dtype, device=device)
            if std.ndim == 1 and inputs.ndim > 2:
                std = std.reshape(1, -1, *([1] * (inputs.ndim - 2)))
        T = float(self.temperature)
        out = np.empty(len(inputs), dtype=np.float64)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(inputs), int(self.batch_size)):
                batch = np.ascontiguousarray(inputs[start : start + int(self.batch_size)])
                xt = torch.as_tensor(batch).to(device=device, dtype=dtype)
                if self.epsilon > 0:
                    xt.requires_grad_(True)
                    with torch.enable_grad():
                        logits = output_tensors(model(xt))["logits"]
                        pred = logits.detach().argmax(dim=1)
                        # summed, not averaged: each sample's gradient is independent of the batch
                        loss = torch.nn.functional.cross_entropy(logits / T, pred, reduction="sum")
                        (grad,) = torch.autograd.grad(loss, xt)
                    step = self._step(grad)
                    if std is not None:
                        step = step / std
                    xt = (xt.detach() - float(self.epsilon) * step).detach()
                with torch.no_grad():
                    logits = output_tensors(model(xt))["logits"]
                logits = logits.detach().double().cpu().numpy()
                out[start : start + len(batch)] = softmax(logits / T, axis=1).max(axis=1)
        finally:
            model.train(was_training)
        if not np.all(np.isfinite(out)):
            raise ValueError(
                f"{type(self).__name__}: the network's logits are not finite on "
                f"{int(np.sum(~np.isfinite(out)))} inputs (max |input| {float(np.max(np.abs(inputs))):.1e}); "
                "give the inputs in the units the model was trained on."
            )
        refuse_unresolved_scores(type(self).__name__, out, inputs, "extras['inputs']")
        return out


@register("odin")
class ODIN(_PerturbedSoftmax):
    """ODIN: temperature scaling plus a small input perturbation towards higher confidence.

    ``x̃ = x − ε·sign(∇ₓ CE(f(x)/T, ŷ))``, score ``max softmax(f(x̃)/T)``, with ``ŷ`` the
    predicted class. ``input_std`` (per-channel normalisation std) expresses ε in raw pixel
    units, as the original code does for normalised images. Elements with an exactly zero
    gradient do not move (``sign(0) = 0``; the original code moves them by −ε).
    """

    search_space = {
        "temperature": [1.0, 10.0, 100.0, 1000.0],
        "epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.003, 0.004],
    }
    reference = (
        "Liang, Li & Srikant, Enhancing the Reliability of Out-of-distribution Image "
        "Detection in Neural Networks (ODIN), ICLR 2018"
    )

    def _step(self, grad):
        import torch

        return torch.sign(grad)


@register("iodin", "i-odin")
class IODIN(_PerturbedSoftmax):
    """i-ODIN: ODIN (T=1000, ε=0.0014) but only the single input element with the largest
    absolute gradient is perturbed (per sample)."""

    search_space = {"epsilon": [0.0005, 0.0014, 0.005, 0.01, 0.05]}
    reference = (
        "ASCOOD: Going Beyond Conventional OOD Detection / Image-based Outlier Synthesis With "
        "Training Data (i-ODIN scorer)"
    )

    def _step(self, grad):
        import torch

        flat = grad.reshape(grad.shape[0], -1)
        idx = flat.abs().argmax(dim=1, keepdim=True)
        step = torch.zeros_like(flat)
        step.scatter_(1, idx, torch.sign(flat.gather(1, idx)))
        return step.reshape(grad.shape)


@register("gradnorm")
class GradNorm(Detector):
    """GradNorm: L1 norm of the gradient of KL(uniform ‖ softmax(f/T)) w.r.t. the last
    layer's weights, in closed form from cached logits and features (no network needed).

    With logits ``z = W h + b`` and ``p = softmax(z/T)``, the loss
    ``KL(u ‖ p) = const − (1/C)·Σ_c log p_c`` has ``∂/∂z = (p − 1/C)/T``, so
    ``∂/∂W = (p − 1/C) hᵀ / T`` — an outer product whose L1 norm is
    ``‖p − 1/C‖₁ · ‖h‖₁ / T``. Higher = in-distribution (confident and large features).
    ``head`` is required so the features are known to be the head's input.
    """

    requires = frozenset({"logits", "features", "head"})
    fit_fields = None
    search_space = {"temperature": [1.0]}
    reference = (
        "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional "
        "Shifts in the Wild (GradNorm), NeurIPS 2021"
    )

    def __init__(self, temperature: float = 1.0, chunk_size: int = 65536):
        self.temperature = temperature
        self.chunk_size = chunk_size

    def _check_params(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")

    def _score(self, x: Features) -> np.ndarray:
        T = float(self.temperature)
        n, c = x.logits.shape
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, int(self.chunk_size)):
            sl = slice(start, start + int(self.chunk_size))
            p = softmax(np.asarray(x.logits[sl], dtype=np.float64) / T, axis=1)
            grad_logits = np.abs(p - 1.0 / c).sum(axis=1)
            feat_l1 = np.abs(np.asarray(x.features[sl], dtype=np.float64)).sum(axis=1)
            out[sl] = grad_logits * feat_l1 / T
        return out
