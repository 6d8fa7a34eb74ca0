"""oodscope: out-of-distribution detection for any trained model.

>>> import oodscope as ood
>>> det = ood.create("energy").fit()
>>> scores = det.score(features)          # higher = more in-distribution

Heavy subpackages (``text``, ``vlm``, ``data``, ``models``, ``train``, ``bench``, ``report``)
are imported on first use so ``import oodscope`` stays fast and does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import metrics
from .detectors import Detector, NotFittedError, create, detector_info, list_detectors, register
from ._version import __version__
from .features import Features


__all__ = [
    "Detector",
    "Features",
    "Guard",
    "NotFittedError",
    "create",
    "detector_info",
    "extract",
    "list_detectors",
    "load",
    "metrics",
    "register",
    "save",
    "__version__",
]

_LAZY_MODULES = {"text", "vlm", "data", "models", "train", "bench", "report", "cli", "extraction",
                 "detectors", "persistence", "guard", "serve"}


def extract(model, data, **kwargs: Any) -> Features:
    """Run ``model`` once over ``data``; see `oodscope.extraction.extract`."""
    from .extraction import extract as _extract

    return _extract(model, data, **kwargs)


def save(obj, path) -> Any:
    """Save a fitted detector or a `Guard` to the directory ``path`` (arrays + JSON, a
    SHA-256 manifest, never pickle); see `oodscope.persistence`."""
    from .guard import Guard
    from .persistence import save_detector

    if isinstance(obj, Guard):
        return obj.save(path)
    if isinstance(obj, Detector):
        return save_detector(obj, path)
    raise TypeError(f"oodscope.save takes a Detector or a Guard, got {type(obj).__name__}.")


def load(path, **runtime: Any):
    """Load a saved detector or `Guard`. The manifest is checked first (a modified,
    truncated or extra file is a ``ValueError``); ``runtime`` passes objects that are not
    written to disk (``model=`` for ODIN-like detectors)."""
    from .guard import Guard
    from .persistence import detector_from_document, read_saved

    kind, document, arrays, source = read_saved(path)
    if kind == "guard":
        return Guard._from_document(document, arrays, source, runtime)
    return detector_from_document(document, arrays, source, runtime)


def __getattr__(name: str) -> Any:
    if name == "Guard":
        from .guard import Guard

        return Guard
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'oodscope' has no attribute {name!r}")
