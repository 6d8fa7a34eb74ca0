"""Training: a small loop with pluggable objectives (cross-entropy and OOD-aware ones)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Objective, create_objective, list_objectives, register_objective

__all__ = ["Objective", "create_objective", "list_objectives", "register_objective", "fit", "objectives"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from .loop import fit

        return fit
    if name in ("objectives", "outliers", "loop"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
