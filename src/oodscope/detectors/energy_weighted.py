"""Weighted energy (WEBO), the test-time score of VOS (Du et al., ICLR 2022)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .._numeric import logsumexp
from ..features import Features
from .base import Detector, register

__all__ = ["WeightedEnergy"]


@register("webo", "weighted_energy")
class WeightedEnergy(Detector):
    """Weighted energy: ``log Σ_c relu(w_c) exp(f_c(x))`` (higher = in-distribution).

    VOS learns the class weights ``w`` (its ``weight_energy`` layer, ``Linear(C, 1)``) jointly
    with the classifier while regularising the energy of synthesised virtual outliers; the
    authors' code applies ``relu`` to them inside the log-sum-exp, as done here. The weights
    are therefore a property of a VOS-trained network, not something a post-hoc fit on ID data
    recovers: pass them as ``energy_weights`` (C numbers, e.g.
    ``net.weight_energy.weight.detach().numpy().ravel()``). With all weights equal to 1 the
    score is the plain energy score. Classes whose weight is ≤ 0 drop out of the sum; at least
    one must be positive.
    """

    requires = frozenset({"logits"})
    fit_fields = None
    reference = (
        "Du, Wang, Cai & Li, VOS: Learning What You Don't Know by Virtual Outlier Synthesis, "
        "ICLR 2022 (weighted energy score)"
    )

    def __init__(self, energy_weights: Sequence[float] | None = None):
        self.energy_weights = energy_weights

    def _weights(self) -> np.ndarray:
        if self.energy_weights is None:
            raise ValueError(
                "WeightedEnergy needs the class weights a VOS-trained network learned "
                "(energy_weights=net.weight_energy.weight.ravel()); this network provides none. "
                "For an ordinary classifier use the 'energy' detector."
            )
        w = np.asarray(self.energy_weights, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(w)):
            raise ValueError("WeightedEnergy: energy_weights contain NaN or inf.")
        if not np.any(w > 0):
            raise ValueError("WeightedEnergy: at least one energy weight must be > 0 (relu(w) is used).")
        return w

    def _check_params(self) -> None:
        self._weights()

    def _score(self, x: Features) -> np.ndarray:
        w = self._weights()
        z = np.asarray(x.logits, dtype=np.float64)
        if z.shape[1] != len(w):
            raise ValueError(
                f"WeightedEnergy has {len(w)} energy weights but the logits have {z.shape[1]} classes."
            )
        positive = w > 0
        # log Σ_c w_c e^{z_c} = logsumexp(z_c + log w_c) over classes with w_c > 0
        return logsumexp(z[:, positive] + np.log(w[positive]), axis=1)

