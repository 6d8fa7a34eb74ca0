"""Detector families. Each module registers its classes with `register`."""

from __future__ import annotations

import importlib

from .base import (
    Detector,
    NotFittedError,
    create,
    detector_info,
    get_detector_class,
    list_detectors,
    register,
)

__all__ = [
    "Detector",
    "NotFittedError",
    "create",
    "detector_info",
    "get_detector_class",
    "list_detectors",
    "register",
]

FAMILIES = ("logits", "shaping", "distance", "density", "gradient", "ensemble", "vlm", "text", "sdm",
            "vlm_tuned", "vlm_foundation",
            "rank", "neuron", "adascale", "prototype", "mdsens", "energy_weighted", "openmax", "bayes",
            "multilayer",
            "discopatch", "mol")
_loaded = False


def _load_builtin() -> None:
    """Import every family module once (they register their detectors on import)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for fam in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{fam}":
                raise
