"""The `Objective` interface: one class per training method, plugged into `train.fit`.

An objective computes the loss for one batch. It may add parameters to the model in
``setup`` (prototypes, a temperature branch), needs outliers when ``needs_outliers`` is
true, and can say which detector scores a model trained with it (``default_detector``).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Objective", "register_objective", "create_objective", "list_objectives", "CrossEntropy"]

_OBJECTIVES: dict[str, type["Objective"]] = {}


def register_objective(name: str):
    def deco(cls):
        cls.name = name
        _OBJECTIVES[name.lower()] = cls
        return cls

    return deco


def _load() -> None:
    import importlib

    for module in ("oodscope.train.objectives", "oodscope.train.hvcm", "oodscope.train.weight_ensembles"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def create_objective(name: str, **params: Any) -> "Objective":
    _load()
    key = name.lower()
    if key not in _OBJECTIVES:
        raise ValueError(f"Unknown training method {name!r}; available: {sorted(_OBJECTIVES)}.")
    return _OBJECTIVES[key](**params)


def list_objectives() -> list[str]:
    _load()
    return sorted(_OBJECTIVES)


class Objective:
    """Base class. Subclasses implement `loss`."""

    name: ClassVar[str] = ""
    needs_outliers: ClassVar[bool] = False
    #: detector (registry name) the method's paper scores with
    default_detector: ClassVar[str] = "msp"
    #: extra detector parameters for scoring (e.g. to read a learned temperature)
    detector_params: ClassVar[dict[str, Any]] = {}

    def setup(self, model, num_classes: int) -> None:
        """Called once before training; may check or extend the model."""

    def parameters(self):
        """Extra trainable tensors the objective owns (e.g. prototypes); default none."""
        return []

    def loss(self, model, x, y, x_out=None):
        """Return ``(loss, logs)`` for one batch: a scalar tensor and a dict of floats."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Hook for schedules (EMA updates, warm-ups)."""

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


@register_objective("ce")
class CrossEntropy(Objective):
    """Plain cross-entropy: the baseline every OOD-aware method is compared with."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, model, x, y, x_out=None):
        import torch.nn.functional as F

        from .._outputs import logits_of

        logits = logits_of(model(x))
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"ce": float(loss.detach())}
