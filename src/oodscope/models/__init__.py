"""Reference networks, checkpoints and adapters for outside models.

>>> from oodscope import models
>>> net = models.create("small_cnn", num_classes=10)            # 28x28 grey inputs
>>> wrapped = models.adapt(my_net, penultimate="avgpool")         # any torch model

Every network here ends in an ``nn.Linear`` attribute ``fc``: `oodscope.extract` records
the head's input as the penultimate features and the head's weights for the detectors that
reshape activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .adapt import Adapted, adapt
from .checkpoint import load_checkpoint, save_checkpoint
from .nets import ResNet18Cifar, SmallCNN

__all__ = [
    "Adapted",
    "ResNet18Cifar",
    "SmallCNN",
    "adapt",
    "create",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]

_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, builder: Callable[..., Any]) -> None:
    """Make ``create(name, num_classes, in_channels, **kw)`` build ``builder(num_classes=, in_channels=, **kw)``."""
    _MODELS[name.lower()] = builder


register_model("small_cnn", SmallCNN)
register_model("resnet18_cifar", ResNet18Cifar)


def list_models() -> list[str]:
    return sorted(_MODELS)


def create(name: str, num_classes: int, in_channels: int = 1, **kwargs):
    """Build registered network ``name`` (see `list_models`)."""
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {list_models()}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if in_channels not in (1, 3) and not (isinstance(in_channels, int) and in_channels > 0):
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
    model = _MODELS[key](num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.oodscope_arch = {"name": key, "kwargs": {"num_classes": num_classes, "in_channels": in_channels, **kwargs}}
    return model
