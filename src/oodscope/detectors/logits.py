"""Detectors that read only the logits."""

from __future__ import annotations

import numpy as np

from .._numeric import logsumexp, softmax
from ..features import Features
from .base import Detector, register


@register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017)."""

    requires = frozenset({"logits"})
    reference = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")

    def _score(self, x: Features) -> np.ndarray:
        return softmax(x.logits / self.temperature, axis=1).max(axis=1)


@register("energy")
class Energy(Detector):
    """Negative free energy ``T·logsumexp(f/T)`` (Liu et al., NeurIPS 2020)."""

    requires = frozenset({"logits"})
    search_space = {"temperature": [0.5, 1.0, 2.0, 5.0]}
    reference = "Liu et al., Energy-based Out-of-distribution Detection, NeurIPS 2020"

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _check_params(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")

    def _score(self, x: Features) -> np.ndarray:
        return self.temperature * logsumexp(x.logits / self.temperature, axis=1)
