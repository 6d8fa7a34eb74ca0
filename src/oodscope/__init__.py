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
from .features import Features

__version__ = "0.1.0"

__all__ = [
    "Detector",
    "Features",
    "NotFittedError",
    "create",
    "detector_info",
    "extract",
    "list_detectors",
    "metrics",
    "register",
    "__version__",
]

_LAZY_MODULES = {"text", "vlm", "data", "models", "train", "bench", "report", "cli", "extraction", "detectors"}


def extract(model, data, **kwargs: Any) -> Features:
    """Run ``model`` once over ``data``; see `oodscope.extraction.extract`."""
    from .extraction import extract as _extract

    return _extract(model, data, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'oodscope' has no attribute {name!r}")
