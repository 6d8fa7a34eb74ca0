"""Training-time OOD objectives: Outlier Exposure, MixOE, LogitNorm, AbeT, PALM, ASCOOD.

Each class implements `oodscope.train.base.Objective`: ``loss(model, x, y, x_out)`` returns
``(scalar loss, dict of floats)``. ``default_detector`` names the detector the method's paper
scores with. Default hyperparameters follow the papers, scaled for small networks trained
for a few epochs on 28x28 images where noted.

Objectives that change the network's head (AbeT, ASCOOD) do so in ``setup`` (which
`train.fit` calls before building the optimiser): ``model.fc`` is replaced in place, see
`oodscope.train.heads`. ``prepare_model(model, num_classes)`` does the same and returns the
model, for callers that build their own optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._outputs import logits_of
from .._params import store_params
from .base import CrossEntropy, Objective, register_objective
from .heads import AbeTHead, ZScoreHead, attach_abet_head, attach_zscore_head, classifier_head

__all__ = ["CrossEntropy", "OutlierExposure", "MixOE", "LogitNorm", "AbeT", "PALM", "ASCOOD",
           "sinkhorn", "mix_batch", "cutmix_box"]


# --------------------------------------------------------------------------- helpers
def _forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Run ``model(x)``; return its output and the input of its classifier head."""
    from ..extraction import find_head

    _, head = find_head(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear classifier head; the objective needs the "
            "penultimate features (the input of a final nn.Linear named 'fc')."
        )
    captured: dict[str, torch.Tensor] = {}
    hook = head.register_forward_pre_hook(lambda m, inp: captured.__setitem__("h", inp[0]))
    try:
        out = model(x)
    finally:
        hook.remove()
    return out, captured["h"].flatten(1)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the uniform distribution to softmax(logits) (= KL + log C)."""
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


def _require_outliers(method: str, x: torch.Tensor, x_out: torch.Tensor | None) -> torch.Tensor:
    if x_out is None or len(x_out) == 0:
        raise ValueError(
            f"{method} needs auxiliary outliers but got none. Pass outliers=... to train.fit "
            "(e.g. oodscope.train.outliers.get_outlier_source('photos', image_shape=...)), or "
            "`--outliers photos` on the command line."
        )
    if tuple(x_out.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"{method}: outlier images have shape {tuple(x_out.shape[1:])} but the training images "
            f"{tuple(x.shape[1:])}. Build the source with image_shape={tuple(x.shape[1:])} "
            "(get_outlier_source resizes and converts channels)."
        )
    return x_out.to(device=x.device, dtype=x.dtype)


def _check_finite(loss: torch.Tensor, method: str, step: int, cause: str) -> None:
    if not torch.isfinite(loss):
        from .loop import NonFiniteLossError

        raise NonFiniteLossError(
            f"{method}: the loss became {float(loss.detach())} at step {step}. Likely cause: {cause} "
            "Lower the learning rate or check the inputs for NaN."
        )


def _match_count(x_out: torch.Tensor, n: int) -> torch.Tensor:
    """Outliers paired with ``n`` ID samples: cycled or cut to length ``n``."""
    if len(x_out) == n:
        return x_out
    return x_out[torch.arange(n, device=x_out.device) % len(x_out)]


class _Stepped(Objective):
    """Keeps a step counter so that a NaN report can say where it happened."""

    _step: int = 0

    def _tick(self) -> int:
        self._step = getattr(self, "_step", 0) + 1
        return self._step

    def prepare_model(self, model: nn.Module, num_classes: int) -> nn.Module:
        self.setup(model, num_classes)
        return model


# --------------------------------------------------------------------------- OE
@register_objective("oe")
class OutlierExposure(_Stepped):
    """Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019).

    ``L = CE(f(x_in), y) + lam * CE(uniform, softmax f(x_out))``: the model is pushed to be
    maximally uncertain on auxiliary outliers. ``regularizer="energy"`` uses the energy
    margin loss of Liu et al. (NeurIPS 2020) instead:
    ``lam_energy * (E[relu(E(x_in) - m_in)^2] + E[relu(m_out - E(x_out))^2])`` with
    ``E = -logsumexp f``, and scores with energy.

    Defaults: lam = 0.5 (the paper's), energy margins m_in = -25, m_out = -7 and weight 0.1
    (the CIFAR values of the energy paper; a 10-class CNN reaches these logit scales too).
    """

    needs_outliers = True

    def __init__(self, lam: float = 0.5, regularizer: str = "uniform", lam_energy: float = 0.1,
                 m_in: float = -25.0, m_out: float = -7.0):
        store_params(self, locals())

    def setup(self, model, num_classes):
        if self.regularizer not in ("uniform", "energy"):
            raise ValueError(f"regularizer must be 'uniform' or 'energy', got {self.regularizer!r}.")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}.")

    @property
    def default_detector(self) -> str:  # type: ignore[override]
        return "energy" if self.regularizer == "energy" else "msp"

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        x_out = _require_outliers("Outlier Exposure", x, x_out)
        logits = logits_of(model(torch.cat([x, x_out])))
        li, lo = logits[: len(x)], logits[len(x):]
        ce = F.cross_entropy(li, y)
        if self.regularizer == "energy":
            e_in = -torch.logsumexp(li, dim=1)
            e_out = -torch.logsumexp(lo, dim=1)
            reg = F.relu(e_in - self.m_in).pow(2).mean() + F.relu(self.m_out - e_out).pow(2).mean()
            loss = ce + self.lam_energy * reg
        else:
            reg = _uniform_cross_entropy(lo)
            loss = ce + self.lam * reg
        _check_finite(loss, "Outlier Exposure", step, "exploding logits (learning rate too high).")
        return loss, {"ce": float(ce.detach()), "outlier": float(reg.detach())}


# --------------------------------------------------------------------------- MixOE
def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None
               ) -> tuple[int, int, int, int]:
    """A random box ``(top, bottom, left, right)`` covering about ``1 - lam`` of the image.

    As in CutMix (Yun et al., ICCV 2019): side ratio ``sqrt(1 - lam)``, random centre,
    clipped to the image, so the realised area can be smaller than asked.
    """
    cut = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return top, bottom, left, right


def mix_batch(x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor, lam: float, num_classes: int,
              mode: str = "mixup", generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix ID images with outliers; return ``(mixed images, soft targets, realised lam)``.

    mixup: ``x~ = lam x + (1 - lam) x_out``. cutmix: an outlier box is pasted into each ID
    image and ``lam`` becomes the fraction of the image left as ID. The soft target is
    ``lam * onehot(y) + (1 - lam) / C``: it moves from the label to uniform.
    """
    x_out = _match_count(x_out, len(x))
    if mode == "mixup":
        mixed = lam * x + (1.0 - lam) * x_out
    elif mode == "cutmix":
        h, w = x.shape[-2:]
        top, bottom, left, right = cutmix_box(h, w, lam, generator)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x_out[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(h * w)
    else:
        raise ValueError(f"mode must be 'mixup' or 'cutmix', got {mode!r}.")
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    target = lam * onehot + (1.0 - lam) / num_classes
    return mixed, target, float(lam)


@register_objective("mixoe")
class MixOE(_Stepped):
    """Mixture Outlier Exposure (Zhang et al., WACV 2023).

    ``lam ~ Beta(alpha, alpha)``; ID images are mixed with outliers (mixup or CutMix) and the
    target decays linearly from one-hot to uniform with the outlier share:
    ``L = CE(f(x), y) + beta * SoftCE(f(x~), lam onehot(y) + (1 - lam) / C)``. Scored with MSP.

    Defaults are the paper's (mixup alpha = 1, beta = 5; use alpha = 2 for CutMix). The paper
    fine-tunes a trained classifier; `train.fit` can start from one or from scratch.
    """

    needs_outliers = True
    default_detector = "msp"

    def __init__(self, alpha: float = 1.0, beta: float = 5.0, mode: str = "mixup"):
        self.alpha = alpha
        self.beta = beta
        self.mode = mode

    def setup(self, model, num_classes):
        if self.mode not in ("mixup", "cutmix"):
            raise ValueError(f"mode must be 'mixup' or 'cutmix', got {self.mode!r}.")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (Beta(alpha, alpha)), got {self.alpha}.")
        self.num_classes_ = int(num_classes)

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        x_out = _require_outliers("MixOE", x, x_out)
        num_classes = getattr(self, "num_classes_", None)
        if num_classes is None:
            raise ValueError("MixOE.setup(model, num_classes) must be called before loss().")
        a = torch.tensor(float(self.alpha))
        lam = float(torch.distributions.Beta(a, a).sample())
        mixed, target, lam = mix_batch(x, y, x_out, lam, num_classes, self.mode)
        logits = logits_of(model(torch.cat([x, mixed])))
        ce = F.cross_entropy(logits[: len(x)], y)
        mix = _soft_cross_entropy(logits[len(x):], target)
        loss = ce + self.beta * mix
        _check_finite(loss, "MixOE", step, "exploding logits (learning rate too high for beta).")
        return loss, {"ce": float(ce.detach()), "mix": float(mix.detach()), "lam": lam}


# --------------------------------------------------------------------------- LogitNorm
@register_objective("logitnorm")
class LogitNorm(_Stepped):
    """Logit Normalization (Wei et al., ICML 2022): ``CE(f / (tau * ||f||), y)``.

    The logit norm no longer grows to lower the loss, which curbs overconfidence. Scored
    with MSP on the raw logits. Default ``tau = 0.04`` (the paper's CIFAR-10 value).
    """

    default_detector = "msp"

    def __init__(self, tau: float = 0.04):
        self.tau = tau

    def setup(self, model, num_classes):
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        logits = logits_of(model(x))
        norms = logits.norm(p=2, dim=1, keepdim=True) + 1e-7
        loss = F.cross_entropy(logits / (norms * self.tau), y)
        _check_finite(loss, "LogitNorm", step, "all-zero or non-finite logits.")
        return loss, {"logitnorm": float(loss.detach()), "logit_norm": float(norms.mean().detach())}


# --------------------------------------------------------------------------- AbeT
@register_objective("abet")
class AbeT(_Stepped):
    """AbeT (Le et al., "Learn to Ablate the Temperature"; Generalized-ODIN-style head).

    The network gets a cosine classifier ``f`` and a learned temperature ``T(x)`` in (0, 1]
    (`oodscope.train.heads.AbeTHead`, attached in ``setup``); training is plain CE on
    ``f / T``. The ``abet`` detector scores ``logsumexp(f / T)`` (energy without the leading
    ``T``), reading ``logits = f`` and ``extras["temperature"] = T``.
    """

    default_detector = "abet"

    def setup(self, model, num_classes):
        attach_abet_head(model, num_classes)

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        if not isinstance(getattr(model, "fc", None), AbeTHead):
            raise ValueError("AbeT needs the AbeTHead (cosine logits + learned temperature) on "
                             "model.fc: call AbeT().setup(model, num_classes) first.")
        out = model(x)
        if not isinstance(out, dict) or "temperature" not in out:
            raise ValueError(
                "AbeT needs a network whose forward returns model.fc(features) unchanged, so that "
                "the AbeTHead's {'logits', 'temperature'} output comes back; "
                f"{type(model).__name__} returned {type(out).__name__}."
            )
        f, t = out["logits"], out["temperature"]
        loss = F.cross_entropy(f / t.unsqueeze(1), y)
        _check_finite(loss, "AbeT", step, "the temperature collapsed towards 0.")
        return loss, {"ce": float(loss.detach()), "temperature": float(t.mean().detach())}


# --------------------------------------------------------------------------- PALM
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignment of ``B`` samples to ``K`` prototypes (SwAV-style).

    ``Q = exp(scores / epsilon)`` is alternately normalised so that every prototype gets
    mass ``B / K`` and every sample mass 1 (rows end exactly at 1 after the last step;
    columns converge to ``B / K`` as ``iterations`` grows). Returns ``(B, K)``.
    """
    b, k = scores.shape
    # subtract the max before exp for stability (a constant factor cancels in the normalisation)
    q = torch.exp((scores - scores.max()) / epsilon).T  # (K, B)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


@register_objective("palm")
class PALM(_Stepped):
    """PALM: mixture of hyperspherical prototypes (Lu et al., ICLR 2024).

    The penultimate features go through a projection MLP to unit vectors ``z``
    (``proj_dim``-d). Each class has ``num_prototypes`` unit prototypes. Sinkhorn
    (``epsilon``, ``sinkhorn_iters``) assigns samples softly to prototypes; the weights are
    masked to the sample's class, kept to the top ``top_k`` and L1-normalised. Losses:
    ``L_MLE = -sum_j w_j z.p_j / tau + logsumexp_j z.p_j / tau`` (all prototypes) and a
    supervised contrastive loss among the (EMA-updated) prototypes at ``proto_tau``;
    ``L = L_MLE + lam * L_pcon``. Prototypes, as in the authors' code:
    ``p_k <- normalize(m p_k + (1 - m) sum_i w~_ik z_i)`` with ``w~`` the weights normalised
    per prototype (each prototype moves towards the weighted mean of its samples); the
    Sinkhorn assignment and the logits of ``L_MLE`` then use the updated prototypes, with
    the top-k prototypes chosen before the update (the authors' ``loss_mask``).

    The network's ``fc`` is trained as a linear probe on detached features (cross-entropy),
    so the network still classifies; it does not shape the representation. Scored with the
    Mahalanobis distance on L2-normalised penultimate features (SSD+).

    Defaults follow the paper (M = 6, k = 5, tau = 0.1, lam = 1, epsilon = 0.05, 3 Sinkhorn
    iterations) except the prototype momentum: 0.9 instead of 0.999, because a short run on a
    small dataset takes a few thousand steps, not the paper's 500 epochs. One view per image.
    """

    default_detector = "ssd"

    def __init__(self, num_prototypes: int = 6, top_k: int = 5, proj_dim: int = 128,
                 tau: float = 0.1, proto_tau: float = 0.5, lam: float = 1.0,
                 momentum: float = 0.9, epsilon: float = 0.05, sinkhorn_iters: int = 3,
                 probe_weight: float = 1.0):
        store_params(self, locals())

    def setup(self, model, num_classes):
        fc = classifier_head(model, "PALM")
        if not isinstance(fc, nn.Linear):
            raise ValueError(
                f"PALM needs a plain nn.Linear classifier 'fc' (trained as a linear probe on the "
                f"penultimate features); got {type(fc).__name__}."
            )
        if self.num_prototypes < 1 or not 1 <= self.top_k:
            raise ValueError("num_prototypes and top_k must be >= 1.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        d = fc.in_features
        dev = fc.weight.device
        self.num_classes_ = int(num_classes)
        self.projection_ = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True),
                                         nn.Linear(d, self.proj_dim)).to(dev)
        k = self.num_classes_ * self.num_prototypes
        self.prototypes_ = F.normalize(torch.randn(k, self.proj_dim, device=dev), dim=1)
        self.prototype_labels_ = torch.arange(self.num_classes_, device=dev).repeat_interleave(
            self.num_prototypes)

    def parameters(self):
        proj = getattr(self, "projection_", None)
        return list(proj.parameters()) if proj is not None else []

    def assignment(self, z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
        """Class-masked, top-k, L1-normalised Sinkhorn weights ``(B, K)`` (against
        ``prototypes``, default the current ones). ``keep`` (B, K) bool fixes which
        prototypes each sample keeps instead of its own top-k."""
        protos = self.prototypes_ if prototypes is None else prototypes
        q = sinkhorn(z.detach() @ protos.detach().T, self.epsilon, self.sinkhorn_iters)
        mask = (y.unsqueeze(1) == self.prototype_labels_.unsqueeze(0)).to(q.dtype)
        q = q * mask
        if keep is None:
            k = min(self.top_k, self.num_prototypes)
            keep = torch.zeros_like(q, dtype=torch.bool).scatter_(1, q.topk(k, dim=1).indices, True)
        w = q * keep.to(q.dtype)
        return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def prototype_contrastive(self, protos: torch.Tensor) -> torch.Tensor:
        sim = protos @ protos.T / self.proto_tau
        k = len(protos)
        eye = torch.eye(k, dtype=torch.bool, device=protos.device)
        sim = sim.masked_fill(eye, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        same = (self.prototype_labels_.unsqueeze(0) == self.prototype_labels_.unsqueeze(1)) & ~eye
        if not same.any():  # one prototype per class: no positives
            return protos.sum() * 0.0
        log_prob = log_prob.masked_fill(~same, 0.0)
        return -(log_prob.sum(dim=1) / same.sum(dim=1).clamp_min(1)).mean()

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        if getattr(self, "projection_", None) is None:
            raise ValueError("PALM.setup(model, num_classes) must be called before loss().")
        _, h = _forward_with_features(model, x)
        fc = model.fc
        probe = F.cross_entropy(F.linear(h.detach(), fc.weight, fc.bias), y)
        z = F.normalize(self.projection_(h), dim=1)
        w = self.assignment(z, y)
        per_proto = w / w.sum(dim=0, keepdim=True).clamp_min(1e-12)  # each prototype: weights sum to 1
        updated = F.normalize(self.momentum * self.prototypes_ + (1 - self.momentum) * (per_proto.T @ z), dim=1)
        w = self.assignment(z, y, updated, keep=w > 0)
        logits = z @ updated.detach().T / self.tau
        mle = (-(w * logits).sum(dim=1) + torch.logsumexp(logits, dim=1)).mean()
        pcon = self.prototype_contrastive(updated)
        loss = mle + self.lam * pcon + self.probe_weight * probe
        _check_finite(loss, "PALM", step, "collapsed (all-zero) projections.")
        self.prototypes_ = updated.detach()
        return loss, {"mle": float(mle.detach()), "pcon": float(pcon.detach()),
                      "probe_ce": float(probe.detach())}


# --------------------------------------------------------------------------- ASCOOD
@register_objective("ascood")
class ASCOOD(_Stepped):
    """ASCOOD: attribution-guided virtual outliers (Regmi et al., "Going Beyond Conventional
    OOD Detection" / "Image-based Outlier Synthesis With Training Data").

    The saliency ``g = d z_y / d x`` of the true-class logit ranks input elements; ``M`` keeps
    the top ``p_inv`` fraction of ``|g|`` per sample (over C*H*W). Outliers:

    * ``mode="gradient"``: ``x_ood = x + alpha * g * M``;
    * ``mode="shuffle"``: the top ``p_inv`` pixels by ``sum_c exp(g)`` are permuted among
      themselves (all channels together);
    * ``mode="gaussian"``: ``x_ood = x + alpha * N(0, I) * M``.

    The classifier sees per-sample z-scored features (`heads.ZScoreHead`, ``sigma``), and
    ``L = CE(f(x), y) + w * KL(uniform || softmax f(x_ood))``. ``alpha`` decays linearly
    from ``alpha_max`` to ``alpha_min`` over ``decay_epochs`` epochs. The paper scores with a
    post-hoc detector picked per dataset and proposes i-ODIN; ``default_detector`` is
    ``iodin`` and `oodscope.bench.compare` also reports the best detector on validation.

    Defaults: the paper's w = 1, sigma = 0.5, p_inv = 0.1, gradient mode. ``alpha`` is scaled
    down tenfold from the paper's CIFAR values (300 -> 30) to 30 -> 3: the saliency of a small
    CNN on normalised 28x28 inputs is ~0.05 per disrupted pixel, so alpha = 300 shifts those
    pixels by ~15 standard deviations, outliers the network separates trivially. Measured on
    the Fashion-MNIST class split (3 epochs, 6000 images, seed 0), 30 -> 3 gave higher ID
    accuracy (95.0% vs 93.7%) and higher validation AUROC (i-ODIN 0.84 vs 0.70) than 300 -> 30.
    The training logs report ``shift``, the mean |x_ood - x| on the disrupted elements.
    """

    default_detector = "iodin"

    def __init__(self, weight: float = 1.0, sigma: float = 0.5, p_inv: float = 0.1,
                 mode: str = "gradient", alpha_max: float = 30.0, alpha_min: float = 3.0,
                 decay_epochs: int = 10):
        store_params(self, locals())

    def setup(self, model, num_classes):
        if self.mode not in ("gradient", "shuffle", "gaussian"):
            raise ValueError(f"mode must be 'gradient', 'shuffle' or 'gaussian', got {self.mode!r}.")
        if not 0 < self.p_inv <= 1:
            raise ValueError(f"p_inv must be in (0, 1], got {self.p_inv}.")
        attach_zscore_head(model, self.sigma)
        self.epoch_ = 0

    @property
    def alpha(self) -> float:
        span = max(1, int(self.decay_epochs) - 1)
        frac = min(1.0, getattr(self, "epoch_", 0) / span)
        return self.alpha_max + (self.alpha_min - self.alpha_max) * frac

    def on_epoch_end(self, epoch: int) -> None:
        self.epoch_ = int(epoch) + 1

    def saliency(self, model, x, y) -> torch.Tensor:
        """``d logit_y / d x`` per sample (no parameter gradients are kept)."""
        xg = x.detach().clone().requires_grad_(True)
        logits = logits_of(model(xg))
        (g,) = torch.autograd.grad(logits.gather(1, y.unsqueeze(1)).sum(), xg)
        return g.detach()

    def mask(self, g: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the top ``p_inv`` fraction of each sample's input elements.

        gradient/gaussian modes rank the C*H*W elements by ``|g|``; shuffle mode ranks the
        H*W pixel positions by ``sum_c exp(g)`` and masks every channel of the chosen pixels.
        """
        if self.mode == "shuffle" and g.ndim == 4:
            flat = g.exp().sum(dim=1).flatten(1)  # (B, H*W)
        else:
            flat = g.abs().flatten(1)
        k = max(1, int(round(self.p_inv * flat.shape[1])))
        idx = flat.topk(k, dim=1).indices
        m = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
        if self.mode == "shuffle" and g.ndim == 4:
            return m.view(g.shape[0], 1, *g.shape[2:]).expand_as(g).contiguous()
        return m.view_as(g)

    def synthesize(self, x: torch.Tensor, g: torch.Tensor, alpha: float | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x_ood, mask)``; ``x_ood`` equals ``x`` outside ``mask``."""
        alpha = self.alpha if alpha is None else alpha
        m = self.mask(g)
        if self.mode == "gradient":
            x_ood = x + alpha * g * m
        elif self.mode == "gaussian":
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_ood = x + alpha * noise * m
        else:  # shuffle: permute the chosen pixel positions (all channels move together)
            b, c = x.shape[0], x.shape[1] if x.ndim == 4 else 1
            pix = x.reshape(b, c, -1)
            pm = m.reshape(b, c, -1)[:, 0]
            x_ood = pix.clone()
            for i in range(b):
                pos = pm[i].nonzero().squeeze(1)
                perm = pos[torch.randperm(len(pos), generator=generator).to(pos.device)]
                x_ood[i][:, pos] = pix[i][:, perm]
            x_ood = x_ood.view_as(x)
        return x_ood.detach(), m

    def loss(self, model, x, y, x_out=None):
        step = self._tick()
        if not isinstance(getattr(model, "fc", None), ZScoreHead):
            raise ValueError("ASCOOD needs the z-scored-feature head (ZScoreHead) on model.fc: call "
                             "ASCOOD().setup(model, num_classes) first.")
        g = self.saliency(model, x, y)
        x_ood, m = self.synthesize(x, g)
        logits = logits_of(model(torch.cat([x, x_ood])))
        ce = F.cross_entropy(logits[: len(x)], y)
        lo = logits[len(x):]
        c = lo.shape[1]
        kl = (-math.log(c) - F.log_softmax(lo, dim=1).mean(dim=1)).mean()  # KL(U || p)
        loss = ce + self.weight * kl
        _check_finite(loss, "ASCOOD", step, "alpha too large for the input scale (outliers overflow).")
        # mean |x_ood - x| on the disrupted elements, in input units: how strong the outliers are
        shift = float((x_ood - x).abs()[m].mean()) if bool(m.any()) else 0.0
        return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "alpha": self.alpha,
                      "shift": shift}
