"""HVCM's representation-learning half: the attribute head, the mixture-weight head and the
class-centre objective; the density half is the ``gmm`` detector.

Hierarchical Visual Categories Modeling (Yang et al., ICCV 2023; code
Jarvisgivemeasuit/hvcm_ood). A head on the penultimate features ``h``:

    u = normalize(Linear(h) -> bottleneck)         (bottleneck 256, truncated-normal init)
    q = u · normalize(V)ᵀ                          (weight-normalised, no bias, D = 1024)
    π-logits = Linear(u) -> K                       (no bias)

``q`` is read as K chunks of D/K "attributes", each chunk one Gaussian component of its
class. The objective (the repo's ``HVCMLoss``) keeps learnable class centres ``c_{y,k}`` and,
per sample and chunk,

    kl_x  = α · KL(softmax(c_yk) ‖ softmax(q_k))      (centres frozen: pulls q to its centre)
    kl_c  = β · KL(softmax(q_k) ‖ softmax(c_yk))      (q frozen: pulls the centre to q)
    L_hvcm = mean_{b,k} clamp(kl_x + kl_c, 1e-5, 1e5) + mean_{b,k} kl_x.detach() · softmax(π-logits)_k

and an EMA (rate γ) of each class's softmaxed π-logits. Here the classifier ``fc`` on ``h``
(which the head runs beside) is trained with cross-entropy at the same time,
``L = ce_weight · CE + L_hvcm``; the repo's CIFAR script optimises ``L_hvcm`` alone on a
network it loads. After training, `extract_hvcm` returns Features whose ``features`` are
``q`` (N, D) and whose ``extras["mixture_weights"]`` are softmax(π-logits) (N, K): the
``gmm`` detector with ``n_chunks = K`` then fits μ_ck, Σ_ck per class and chunk, π_c from
the mixture weights, and scores ``S = −min_c Σ_k π_ck · ½ Mahalanobis²``.

Defaults are the repo's: K = 32 components, D = 1024 (32 attributes per chunk), bottleneck
256, α = 1.6e-4, β = 1.6e-5, γ = 1e-4 (train.sh / main.sh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._params import store_params
from .base import Objective, register_objective
from .heads import CosineLinear, WrappingHead, classifier_head

__all__ = ["HVCMHead", "HVCM", "attach_hvcm_head", "hvcm_terms", "extract_hvcm"]


class HVCMHead(WrappingHead):
    """The classifier ``fc`` plus HVCM's attribute and mixture-weight heads on the same ``h``.

    ``forward(h)`` returns ``{"logits", "mixture_weights", "mixture_logits", "attributes"}``;
    `oodscope.extract` stores the per-sample tensors as extras. The classifier is registered
    last so that it stays the network's final ``nn.Linear`` (the head `extract` finds).
    """

    def __init__(self, linear: nn.Linear, attribute_dim: int = 1024, num_components: int = 32,
                 bottleneck_dim: int = 256):
        super().__init__()
        if attribute_dim % num_components:
            raise ValueError(f"attribute_dim ({attribute_dim}) must be a multiple of num_components "
                             f"({num_components}): each component is one equal chunk of attributes.")
        self.num_components = int(num_components)
        self.bottleneck = nn.Linear(linear.in_features, bottleneck_dim)
        nn.init.trunc_normal_(self.bottleneck.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(self.bottleneck.bias)
        # u is unit-norm, so the cosine layer is the weight-normalised linear layer with g = 1
        self.attribute = CosineLinear(bottleneck_dim, attribute_dim)
        self.mixture = nn.Linear(bottleneck_dim, num_components, bias=False)
        self.linear = linear

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        u = F.normalize(self.bottleneck(h), dim=1)
        w = self.mixture(u)
        return {"logits": self.linear(h), "attributes": self.attribute(u), "mixture_logits": w,
                "mixture_weights": torch.softmax(w, dim=1)}


def attach_hvcm_head(model: nn.Module, num_classes: int, attribute_dim: int = 1024,
                     num_components: int = 32, bottleneck_dim: int = 256) -> nn.Module:
    """Wrap ``model.fc`` (an ``nn.Linear``) in an `HVCMHead`, in place; idempotent."""
    head = classifier_head(model, "HVCM")
    if isinstance(head, HVCMHead):
        if head.out_features != num_classes:
            raise ValueError(f"The HVCM head has {head.out_features} classes, the data {num_classes}.")
        return model
    if not isinstance(head, nn.Linear):
        raise ValueError(f"HVCM needs a plain nn.Linear classifier 'fc' to run its heads beside; "
                         f"got {type(head).__name__}.")
    if head.out_features != num_classes:
        raise ValueError(f"model.fc has {head.out_features} outputs but the data {num_classes} classes.")
    model.fc = HVCMHead(head, attribute_dim, num_components, bottleneck_dim).to(
        device=head.weight.device, dtype=head.weight.dtype)
    return model


def hvcm_terms(attributes: torch.Tensor, mixture_logits: torch.Tensor, centres: torch.Tensor,
               y: torch.Tensor, alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """The repo's loss terms for one batch: ``{"kl_x", "kl_c", "centre", "weights", "total"}``.

    ``attributes`` (B, D), ``mixture_logits`` (B, K), ``centres`` (C, K, D/K)."""
    b = attributes.shape[0]
    k, per = centres.shape[1], centres.shape[2]
    q = attributes.reshape(b, k, per)
    c = centres[y]
    log_q, log_c = F.log_softmax(q, dim=-1), F.log_softmax(c, dim=-1)
    # KL(P || Q) = sum P (log P - log Q); the frozen side is detached as in the repo
    p_c = log_c.detach().exp()
    kl_x = alpha * (p_c * (log_c.detach() - log_q)).sum(-1)
    p_q = log_q.detach().exp()
    kl_c = beta * (p_q * (log_q.detach() - log_c)).sum(-1)
    centre = torch.clamp(kl_x + kl_c, 1e-5, 1e5).mean()
    weights = (kl_x.detach() * torch.softmax(mixture_logits, dim=1)).mean()
    return {"kl_x": kl_x, "kl_c": kl_c, "centre": centre, "weights": weights, "total": centre + weights}


@register_objective("hvcm")
class HVCM(Objective):
    """HVCM representation learning (Yang et al., ICCV 2023); scored by ``gmm`` on
    `extract_hvcm` Features. See the module docstring for the losses and defaults."""

    default_detector = "gmm"

    def __init__(self, num_components: int = 32, attribute_dim: int = 1024, bottleneck_dim: int = 256,
                 alpha: float = 1.6e-4, beta: float = 1.6e-5, gamma: float = 1e-4, ce_weight: float = 1.0):
        store_params(self, locals())

    @property
    def detector_params(self) -> dict:  # type: ignore[override]
        return {"n_chunks": int(self.num_components)}

    def setup(self, model, num_classes):
        for name in ("num_components", "attribute_dim", "bottleneck_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("alpha", "beta", "ce_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma (the EMA rate of the mixture weights) must be in [0, 1], got {self.gamma!r}.")
        attach_hvcm_head(model, num_classes, self.attribute_dim, self.num_components, self.bottleneck_dim)
        dev = model.fc.linear.weight.device
        per = self.attribute_dim // self.num_components
        self.centres_ = nn.Parameter(torch.randn(num_classes, self.num_components, per, device=dev))
        self.mixture_ema_ = torch.softmax(torch.randn(num_classes, self.num_components, device=dev), dim=1)
        self._step = 0

    def parameters(self):
        c = getattr(self, "centres_", None)
        return [c] if c is not None else []

    def loss(self, model, x, y, x_out=None):
        self._step = getattr(self, "_step", 0) + 1
        if not isinstance(getattr(model, "fc", None), HVCMHead) or getattr(self, "centres_", None) is None:
            raise ValueError("HVCM needs its head on model.fc: call HVCM().setup(model, num_classes) first.")
        out = model(x)
        if not isinstance(out, dict) or "attributes" not in out:
            raise ValueError("HVCM needs a network whose forward returns model.fc(features) unchanged, so "
                             f"the HVCMHead's dict comes back; {type(model).__name__} returned "
                             f"{type(out).__name__}.")
        centres = self.centres_.to(out["attributes"].dtype)
        terms = hvcm_terms(out["attributes"], out["mixture_logits"], centres, y, self.alpha, self.beta)
        ce = F.cross_entropy(out["logits"], y)
        loss = self.ce_weight * ce + terms["total"]
        if not torch.isfinite(loss):
            from .loop import NonFiniteLossError

            raise NonFiniteLossError(f"HVCM: the loss became {float(loss.detach())} at step {self._step}. "
                                     "Lower the learning rate or check the inputs for NaN.")
        self._update_ema(out["mixture_logits"].detach(), y)
        return loss, {"ce": float(ce.detach()), "hvcm_centre": float(terms["centre"].detach()),
                      "hvcm_weights": float(terms["weights"].detach())}

    @torch.no_grad()
    def _update_ema(self, mixture_logits: torch.Tensor, y: torch.Tensor) -> None:
        ema = self.mixture_ema_.to(mixture_logits.dtype)
        probs = torch.softmax(mixture_logits, dim=1)
        for c in y.unique():
            ema[c] = self.gamma * probs[y == c].mean(0) + (1 - self.gamma) * ema[c]
        self.mixture_ema_ = ema

    def __repr__(self) -> str:
        keys = ("num_components", "attribute_dim", "bottleneck_dim", "alpha", "beta", "gamma", "ce_weight")
        return f"HVCM({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"


def extract_hvcm(model: nn.Module, data, **kwargs):
    """`oodscope.extract` for a network trained with `HVCM`: ``features`` = the attributes
    ``q`` (N, D), ``extras["mixture_weights"]`` (N, K), logits from the classifier. Feed it
    to ``oodscope.create("gmm", n_chunks=K)``."""
    from ..extraction import extract

    if not isinstance(getattr(model, "fc", None), HVCMHead):
        raise ValueError("extract_hvcm needs a network trained with the HVCM objective (an HVCMHead on "
                         "model.fc); train it with oodscope.train.fit(..., objective='hvcm').")
    f = extract(model, data, penultimate="fc.attribute", **kwargs)
    extras = {k: v for k, v in f.extras.items() if k not in ("attributes", "mixture_logits")}
    return f.replace(extras=extras)

