"""Wrap someone else's network so `oodscope.extract` finds its features and head."""

from __future__ import annotations

from torch import nn

from .._outputs import logits_of

__all__ = ["Adapted", "adapt"]


class Adapted(nn.Module):
    """A user network exposed the oodscope way: ``fc`` is its classifier head (an
    ``nn.Linear``) and the forward pass returns logits.

    With ``penultimate`` named, the logits are recomputed as ``fc(flatten(penultimate output))``
    so that the features extract() records and the logits are consistent by construction;
    the layer's flattened output must therefore have ``fc.in_features`` values.
    """

    def __init__(self, model: nn.Module, head: str, penultimate: str | None = None):
        super().__init__()
        modules = dict(model.named_modules())
        self.model = model
        self.head_name = head
        self.penultimate = penultimate
        self.fc = modules[head]
        self._captured = None
        if penultimate is not None:
            modules[penultimate].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._captured = output

    def forward(self, x):
        self._captured = None
        logits = logits_of(self.model(x))
        if self.penultimate is None:
            return logits
        feats = logits_of(self._captured) if self._captured is not None else None
        if feats is None:
            raise ValueError(f"Layer {self.penultimate!r} did not run in the forward pass.")
        feats = feats.flatten(1)
        if feats.shape[1] != self.fc.in_features:
            raise ValueError(
                f"Layer {self.penultimate!r} outputs {feats.shape[1]} values per sample but the head "
                f"{self.head_name!r} takes {self.fc.in_features}; name the layer whose output feeds the head.")
        return self.fc(feats)


def _from_name(name: str, **kwargs) -> nn.Module:
    try:
        import timm

        return timm.create_model(name, **kwargs)
    except ImportError:
        pass
    try:
        import torchvision

        return getattr(torchvision.models, name)(**kwargs)
    except (ImportError, AttributeError):
        pass
    raise ValueError(f"Cannot build {name!r}: it is not a timm or torchvision model name, or neither "
                     "library is installed (pip install timm).")


def adapt(model, penultimate: str | None = None, head: str | None = None, **kwargs) -> Adapted:
    """Wrap ``model`` (an ``nn.Module``, or a timm/torchvision model name built with
    ``kwargs``) so `oodscope.extract` works: ``head`` names the final ``nn.Linear`` (found
    automatically when omitted: ``get_classifier()``, ``fc``, ``head``, ``classifier``, or the
    last linear layer) and ``penultimate`` optionally names the layer whose output feeds it.
    """
    from ..extraction import find_head

    if isinstance(model, str):
        model = _from_name(model, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt needs a torch.nn.Module or a model name, got {type(model).__name__}.")
    modules = dict(model.named_modules())
    if penultimate is not None and penultimate not in modules:
        raise ValueError(f"No module named {penultimate!r}; some valid names: {[n for n in modules if n][:40]}")
    head_name, head_mod = find_head(model, head)
    if head_mod is None:
        raise ValueError("The model has no nn.Linear layer to use as the head; name one with head=.")
    return Adapted(model, head_name, penultimate)
