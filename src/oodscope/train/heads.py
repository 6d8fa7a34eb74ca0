"""Classifier heads that training-time OOD methods put on a network.

A network in oodscope ends in an ``nn.Linear`` attribute ``fc`` whose input is the
penultimate feature vector. The heads here replace that ``fc`` *in place*, so the network's
own ``forward`` (``return self.fc(features)``) keeps working and returns what the method
needs:

* `AbeTHead` (AbeT, Le et al. 2023, building on Generalized ODIN, Hsu et al. 2020): cosine
  logits ``f_i(x) = cos(w_i, h(x))`` and a learned input-dependent temperature
  ``T(x) = sigmoid(BN(Linear(h(x))))`` in (0, 1]. The network then returns
  ``{"logits": f, "temperature": T}``; `oodscope.extract` turns ``temperature`` into an
  extra, and the ``abet`` detector scores ``logsumexp(f / T)``.
* `ZScoreHead` (ASCOOD, "Image-based Outlier Synthesis With Training Data"): per-sample
  z-scored features ``sigma * (h - mean(h)) / (std(h) + 1e-6)`` before the linear layer.

In both heads the last ``nn.Linear`` in module order is the layer that produces the logits,
so `oodscope.extraction.find_head` finds it and features are that layer's input.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["CosineLinear", "WrappingHead", "AbeTHead", "ZScoreHead", "attach_abet_head",
           "attach_zscore_head", "classifier_head"]


def classifier_head(model: nn.Module, method: str) -> nn.Module:
    """Return ``model.fc`` or raise a `ValueError` that names the head ``method`` needs."""
    head = getattr(model, "fc", None)
    if head is None or not isinstance(head, nn.Module):
        raise ValueError(
            f"{method} needs a network whose classifier is an nn.Linear attribute named 'fc' "
            f"(features = its input), like oodscope.models.create('small_cnn'); "
            f"{type(model).__name__} has no 'fc'."
        )
    return head


class CosineLinear(nn.Linear):
    """``nn.Linear`` without bias whose output is the cosine between input and each row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(h, dim=1, eps=1e-12), F.normalize(self.weight, dim=1, eps=1e-12))


class WrappingHead(nn.Module):
    """A head built around the layer that produces its logits (attribute ``logit_layer``):
    ``in_features`` / ``out_features`` are that layer's, so the head reads like the
    ``nn.Linear`` it replaced."""

    logit_layer = "linear"

    @property
    def in_features(self) -> int:
        return getattr(self, self.logit_layer).in_features

    @property
    def out_features(self) -> int:
        return getattr(self, self.logit_layer).out_features


class AbeTHead(WrappingHead):
    """Cosine classifier plus learned temperature ``T(x) = sigmoid(BN(Linear(h)))`` in (0, 1].

    Returns ``{"logits": f, "temperature": T}`` with ``f`` the cosine logits (in [-1, 1]) and
    ``T`` of shape ``(batch,)``. Training uses cross-entropy on ``f / T``.
    """

    logit_layer = "cosine"

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        # registered first so that the cosine layer is the last nn.Linear (= the head)
        self.temperature = nn.Sequential(nn.Linear(in_features, 1), nn.BatchNorm1d(1))
        self.cosine = CosineLinear(in_features, num_classes)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        t = torch.sigmoid(self.temperature(h)).squeeze(1)
        # sigmoid underflows to 0 for very negative inputs; keep T strictly positive, at most 1
        t = (t + 1e-12).clamp(max=1.0)
        return {"logits": self.cosine(h), "temperature": t}


class ZScoreHead(WrappingHead):
    """Per-sample z-scored features, scaled by ``sigma``, then a linear classifier."""

    def __init__(self, linear: nn.Linear, sigma: float = 0.5):
        super().__init__()
        self.sigma = float(sigma)
        self.linear = linear

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        h = h.flatten(1)
        mean = h.mean(dim=1, keepdim=True)
        std = h.std(dim=1, keepdim=True)
        return self.sigma * (h - mean) / (std + 1e-6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.normalize(h))


def _linear_fc(model: nn.Module, method: str, required: str) -> nn.Linear:
    head = classifier_head(model, method)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{method} needs {required}; the network's 'fc' is a {type(head).__name__}. "
            f"Start from a plain network whose 'fc' is an nn.Linear (e.g. "
            f"oodscope.models.create('small_cnn', num_classes)); the head is attached for you."
        )
    return head


def attach_abet_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace ``model.fc`` (an ``nn.Linear``) by an `AbeTHead`, in place; idempotent."""
    head = getattr(model, "fc", None)
    if isinstance(head, AbeTHead):
        if head.cosine.out_features != num_classes:
            raise ValueError(f"The AbeT head has {head.cosine.out_features} classes, the data {num_classes}.")
        return model
    fc = _linear_fc(model, "AbeT", "a cosine head with a learned temperature (AbeTHead)")
    new = AbeTHead(fc.in_features, num_classes).to(device=fc.weight.device, dtype=fc.weight.dtype)
    model.fc = new
    return model


def attach_zscore_head(model: nn.Module, sigma: float = 0.5) -> nn.Module:
    """Put per-sample feature z-scoring in front of ``model.fc``, in place; idempotent.

    The existing linear layer (and its trained weights) is kept inside the new head.
    """
    head = getattr(model, "fc", None)
    if isinstance(head, ZScoreHead):
        head.sigma = float(sigma)
        return model
    fc = _linear_fc(model, "ASCOOD", "a z-scored-feature head (ZScoreHead)")
    model.fc = ZScoreHead(fc, sigma)
    return model
