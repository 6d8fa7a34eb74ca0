"""Weight-space ensembles: WiSE-FT interpolation, uniform weight averaging, and BANG.

* **WiSE-FT** (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):
  ``θ_α = (1 − α)·θ_0 + α·θ_1`` between a pre-trained model ``θ_0`` and the same network
  fine-tuned from it, ``θ_1``. ``α = 0`` is the pre-trained model, ``α = 1`` the fine-tuned
  one; the paper reports that intermediate ``α`` (0.5 by default) keeps most of the
  fine-tuned accuracy and much of the pre-trained robustness under distribution shift.
* **Uniform averaging** ("model soups", Wortsman et al., ICML 2022): the mean of several
  fine-tuned copies of one pre-trained network.
* **BANG** (Lin et al., "Spurious Feature Diversification Improves Out-of-distribution
  Generalization", ICLR 2024: *BAlaNced averaGing*): the fine-tuned model is over-confident
  out of distribution, which lets it dominate the average; BANG fine-tunes with Mixup
  and/or label smoothing (`MixupSmoothing`) before the WiSE-FT average.

Only floating-point parameters and buffers are interpolated. Integer buffers (BatchNorm's
``num_batches_tracked``) are taken from the fine-tuned model. BatchNorm running statistics
are interpolated like weights, which is only an approximation of the statistics of the
interpolated network: `recompute_batchnorm` re-estimates them on training data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .base import Objective, register_objective

__all__ = [
    "MixupSmoothing",
    "average_weights",
    "bang",
    "finetune_and_ensemble",
    "interpolate_weights",
    "recompute_batchnorm",
    "wise_ft",
    "wise_ft_sweep",
]


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.") from None
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (0 = pre-trained, 1 = fine-tuned), got {alpha}.")
    return a


def _check_same_architecture(states: Sequence[dict], what: str) -> None:
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            missing = sorted(set(keys) - set(s))[:5]
            extra = sorted(set(s) - set(keys))[:5]
            raise ValueError(
                f"{what}: model {i} has different parameters from model 0 (missing {missing}, extra "
                f"{extra}); weight-space ensembles need copies of one architecture, fine-tuned from "
                "one pre-trained network.")
        for k in keys:
            if tuple(s[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"{what}: parameter {k!r} has shape {tuple(s[k].shape)} in model {i} "
                                 f"but {tuple(states[0][k].shape)} in model 0.")


def _combine(states: Sequence[dict], coefs: Sequence[float], what: str) -> dict:
    """``Σ_i c_i·θ_i`` for floating tensors; non-float tensors from the last state."""
    import torch

    _check_same_architecture(states, what)
    out = {}
    for k in states[0]:
        tensors = [s[k] for s in states]
        if not torch.is_floating_point(tensors[0]):
            out[k] = tensors[-1].clone()
            continue
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for c, t in zip(coefs, tensors):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}: parameter {k!r} holds NaN or inf; the model is broken.")
            acc += c * t.detach().to(torch.float64)
        out[k] = acc.to(tensors[0].dtype)
    return out


def interpolate_weights(state_0: dict, state_1: dict, alpha: float) -> dict:
    """``(1 − α)·state_0 + α·state_1`` for two state dicts of one architecture."""
    a = _check_alpha(alpha)
    return _combine([state_0, state_1], [1.0 - a, a], "interpolate_weights")


def wise_ft(pretrained, finetuned, alpha: float = 0.5):
    """A new model with WiSE-FT weights ``(1 − α)·θ_pretrained + α·θ_finetuned``.

    Neither input is modified. The result is in eval mode.
    """
    state = interpolate_weights(pretrained.state_dict(), finetuned.state_dict(), alpha)
    model = copy.deepcopy(finetuned)
    model.load_state_dict(state)
    return model.eval()


def wise_ft_sweep(pretrained, finetuned, alphas: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0)):
    """``{alpha: model}`` along the WiSE-FT line."""
    return {float(a): wise_ft(pretrained, finetuned, a) for a in alphas}


def average_weights(models: Sequence[Any], weights: Sequence[float] | None = None):
    """A new model whose weights are the (weighted) mean of ``models``' ("uniform soup")."""
    models = list(models)
    if not models:
        raise ValueError("average_weights needs at least one model.")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models.")
    if any(w < 0 or not math.isfinite(w) for w in weights) or not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}.")
    state = _combine([m.state_dict() for m in models], weights, "average_weights")
    model = copy.deepcopy(models[-1])
    model.load_state_dict(state)
    return model.eval()


def recompute_batchnorm(model, data, batches: int = 50, batch_size: int = 256, mean=None, std=None,
                        device: str = "cpu"):
    """Re-estimate BatchNorm running statistics of ``model`` on ``data`` (in place).

    An interpolated network's BatchNorm statistics are not the interpolation of its
    endpoints' statistics; this runs ``batches`` forward passes in train mode with
    cumulative averaging (momentum ``None``) and returns the model in eval mode.
    """
    import torch

    from .loop import _as_loader, _xy

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(_as_loader(data, batch_size, True, 0, mean, std, "batchnorm data")):
                if i >= batches:
                    break
                x, _ = _xy(batch)
                model(x.to(device).float())
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    return model.eval()


@register_objective("mixup_ls")
class MixupSmoothing(Objective):
    """Cross-entropy on Mixup inputs with label-smoothed targets (BANG's fine-tuning loss;
    ``oodscope train --method mixup_ls``).

    ``λ ~ Beta(α, α)`` per batch; ``x̃ = λx + (1 − λ)x[π]`` and the target is the same mix
    of the (smoothed) one-hot labels. ``mixup_alpha = 0`` disables Mixup, ``smoothing = 0``
    disables label smoothing.
    """

    def __init__(self, mixup_alpha: float = 0.2, smoothing: float = 0.1, seed: int = 0):
        if not mixup_alpha >= 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}.")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
        self.mixup_alpha = float(mixup_alpha)
        self.smoothing = float(smoothing)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)

    def setup(self, model, num_classes: int) -> None:
        self._num_classes = int(num_classes)

    def loss(self, model, x, y, x_out=None):
        import torch

        from .._outputs import logits_of

        c = self._num_classes
        target = torch.full((len(y), c), self.smoothing / c, device=x.device)
        target.scatter_(1, y[:, None], 1.0 - self.smoothing + self.smoothing / c)
        lam = 1.0
        if self.mixup_alpha > 0:
            lam = float(self._rng.beta(self.mixup_alpha, self.mixup_alpha))
            perm = torch.as_tensor(self._rng.permutation(len(x)), device=x.device)
            x = lam * x + (1.0 - lam) * x[perm]
            target = lam * target + (1.0 - lam) * target[perm]
        logits = logits_of(model(x))
        loss = -(target * torch.log_softmax(logits.float(), dim=1)).sum(1).mean()
        return loss, {"mix_ce": float(loss.detach()), "lambda": lam}


def finetune_and_ensemble(pretrained, train_data, method: str = "wise-ft", alphas: Iterable[float] = (0.5,),
                          objective: Objective | None = None, mixup_alpha: float = 0.2, smoothing: float = 0.1,
                          bn_data=None, **fit_kwargs: Any):
    """Weight-space ensembling as a training option: fine-tune a copy of ``pretrained`` on
    ``train_data`` and return the WiSE-FT models along ``alphas``.

    ``method="wise-ft"`` fine-tunes with ``objective`` (default plain cross-entropy);
    ``"bang"`` with `MixupSmoothing` (``mixup_alpha``, ``smoothing``). ``bn_data``: re-estimate
    BatchNorm statistics of every interpolated model on it (`recompute_batchnorm`; a no-op
    for networks without BatchNorm). ``fit_kwargs`` go to `oodscope.train.fit`.
    Returns ``({alpha: model}, finetuned_model, history)``; ``pretrained`` is not modified.
    """
    from .base import CrossEntropy
    from .loop import fit

    if method not in ("wise-ft", "bang"):
        raise ValueError(f"method must be 'wise-ft' or 'bang', got {method!r}.")
    alphas = [_check_alpha(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give at least one interpolation coefficient.")
    seed = int(fit_kwargs.get("seed", 0))
    if method == "bang":
        if objective is not None:
            raise ValueError("method='bang' fine-tunes with MixupSmoothing; do not pass objective=.")
        objective = MixupSmoothing(mixup_alpha, smoothing, seed)
    model, history = fit(copy.deepcopy(pretrained), train_data, objective=objective or CrossEntropy(), **fit_kwargs)
    out = {}
    for a in alphas:
        m = wise_ft(pretrained, model, a)
        if bn_data is not None:
            recompute_batchnorm(m, bn_data, mean=fit_kwargs.get("mean"), std=fit_kwargs.get("std"),
                                device=fit_kwargs.get("device", "cpu"))
        out[a] = m
    return out, model.eval(), history


def bang(pretrained, train_data, alpha: float = 0.5, mixup_alpha: float = 0.2, smoothing: float = 0.1,
         **fit_kwargs: Any):
    """BANG: fine-tune a copy of ``pretrained`` with `MixupSmoothing`, then WiSE-FT at ``alpha``.

    ``fit_kwargs`` go to `oodscope.train.fit` (epochs, lr, batch size, mean/std...).
    Returns ``(averaged_model, finetuned_model, history)``.
    """
    models, model, history = finetune_and_ensemble(pretrained, train_data, "bang", (alpha,), None, mixup_alpha,
                                                   smoothing, **fit_kwargs)
    return models[_check_alpha(alpha)], model, history
