"""Reading the logits (and other per-sample tensors) out of whatever a model's forward pass returns."""

from __future__ import annotations

from typing import Any

__all__ = ["logits_of", "output_tensors"]


def logits_of(out: Any) -> Any:
    """The logits in a model output: a tensor, ``out["logits"]``, the first item of a tuple
    or list, or ``out.logits`` (Hugging Face model outputs)."""
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"Model returned a dict without 'logits' (keys: {list(out)}).")
        return out["logits"]
    if isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("Model returned an empty tuple; expected logits first.")
        return out[0]
    if hasattr(out, "shape"):
        return out
    if hasattr(out, "logits"):
        return out.logits
    raise ValueError(f"Cannot read logits from a model output of type {type(out).__name__}.")


def output_tensors(out: Any) -> dict[str, Any]:
    """``{"logits": ...}`` plus, for a dict output, every other per-sample tensor in it (e.g.
    a learned temperature), which `oodscope.extract` keeps as extras."""
    import torch

    if isinstance(out, dict):
        logits_of(out)  # a dict without "logits" is an error
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    return {"logits": out if isinstance(out, torch.Tensor) else logits_of(out)}
