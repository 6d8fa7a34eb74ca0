"""Loading a checkpoint whose network a training objective extended (AbeT's head, ASCOOD's
z-scored features, HVCM's heads): the objective's ``setup`` is replayed on the rebuilt
network before the weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.checkpoint import load_checkpoint as _load

__all__ = ["load_checkpoint"]


def _replay_objective(model: Any, meta: dict) -> None:
    objective = meta.get("objective") or {}
    if objective.get("name"):
        from .base import create_objective

        obj = create_objective(objective["name"], **objective.get("params", {}))
        obj.setup(model, (meta.get("arch") or {}).get("kwargs", {}).get("num_classes"))


def load_checkpoint(path: str | Path, model=None, map_location: str = "cpu"):
    """`oodscope.models.load_checkpoint` that also rebuilds what a training objective added."""
    return _load(path, model=model, map_location=map_location, prepare=_replay_objective)
