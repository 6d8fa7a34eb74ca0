"""Training: a small loop with pluggable objectives (cross-entropy and OOD-aware ones), the
reference networks trained with a fixed recipe, and loading checkpoints of extended networks.

``fit``, ``reference_model``, ``load_checkpoint`` and ``RECIPES`` are imported on first use, so
``import oodscope.train`` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Objective, create_objective, list_objectives, register_objective

__all__ = ["Objective", "RECIPES", "create_objective", "fit", "list_objectives", "load_checkpoint", "objectives",
           "reference_model", "register_objective"]

_LAZY = {"fit": "loop", "reference_model": "reference", "RECIPES": "reference", "load_checkpoint": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("objectives", "outliers", "loop"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
