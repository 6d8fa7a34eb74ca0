"""Monte-Carlo dropout (Gal & Ghahramani, ICML 2016) on the classifier head's input."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._numeric import log_softmax, logsumexp
from .._params import store_params
from ..features import Features
from ._checks import check_int, check_real
from .base import Detector, register

__all__ = ["MCDropout"]

_BLOCK = 2048


@register("mc_dropout", "mcd")
class MCDropout(Detector):
    """MC dropout: average the softmax over ``n_samples`` stochastic forward passes.

    Dropout (drop probability ``p``, survivors scaled by ``1/(1 − p)``) is applied to the input
    of the last linear layer and the head is re-applied: ``p̄(x) = (1/T) Σ_t softmax(W (m_t ⊙ h)
    / (1 − p) + b)``. Score (``criterion``): ``max_c p̄_c`` (``"msp"``, default), the negative predictive
    entropy ``Σ p̄ log p̄`` (``"entropy"``), or minus the mutual information between the
    prediction and the masks (``"mutual_info"``, the BALD term). All in log space.

    Deviation: Gal & Ghahramani keep dropout on at test time wherever the network was trained
    with it; here the stochastic layer is the one before the classifier head — exact for
    networks whose only dropout sits there (as in `oodscope.models.SmallCNN(dropout=...)`),
    and usable on cached features of any network. The ``T`` masks are drawn once from
    ``random_state`` and shared by all samples, so a sample's score never depends on the batch.
    """

    requires = frozenset({"features", "head"})
    search_space: ClassVar[dict[str, list[Any]]] = {"p": [0.1, 0.25, 0.5], "criterion": ["msp", "entropy"]}
    score_params = frozenset({"p", "criterion", "n_samples", "random_state"})
    reference = (
        "Gal & Ghahramani, Dropout as a Bayesian Approximation: Representing Model Uncertainty "
        "in Deep Learning (MC dropout), ICML 2016"
    )

    def __init__(self, p: float = 0.5, n_samples: int = 30, criterion: str = "msp", random_state: int = 0):
        store_params(self, locals())

    def _check_params(self) -> None:
        check_real(self, "p", self.p)
        if self.p >= 1.0:
            raise ValueError(f"MCDropout: p is a drop probability in [0, 1), got {self.p!r}.")
        check_int(self, "n_samples", self.n_samples)
        if self.criterion not in ("msp", "entropy", "mutual_info"):
            raise ValueError(
                f"MCDropout: criterion must be 'msp', 'entropy' or 'mutual_info', got {self.criterion!r}.")

    def masks(self, width: int) -> np.ndarray:
        """(T, width) float64 masks, already scaled by ``1/(1 − p)``."""
        keep = np.random.default_rng(self.random_state).random((int(self.n_samples), width)) >= self.p
        return keep / (1.0 - float(self.p))

    def mean_log_probs(self, x: Features) -> tuple[np.ndarray, np.ndarray]:
        """``(log p̄, mean_t Σ_c p_t log p_t)`` per sample: the log of the averaged softmax and
        the average per-pass negative entropy (for the mutual information)."""
        self._check_params()
        w = np.asarray(x.head_weight, dtype=np.float64)
        b = np.zeros(w.shape[0]) if x.head_bias is None else np.asarray(x.head_bias, dtype=np.float64)
        masks = self.masks(w.shape[1])
        t = len(masks)
        n = len(x)
        log_mean = np.empty((n, w.shape[0]))
        neg_entropy = np.empty(n)
        for start in range(0, n, _BLOCK):
            rows = slice(start, start + _BLOCK)
            h = np.asarray(x.features[rows], dtype=np.float64)
            # (T, rows, C) logits of every pass
            logits = np.einsum("td,nd,cd->tnc", masks, h, w, optimize=True) + b
            logp = log_softmax(logits, axis=2)
            log_mean[rows] = logsumexp(logp, axis=0) - np.log(t)
            neg_entropy[rows] = np.mean(np.sum(np.exp(logp) * logp, axis=2), axis=0)
        return log_mean, neg_entropy

    def _score(self, x: Features) -> np.ndarray:
        log_mean, per_pass_neg_entropy = self.mean_log_probs(x)
        if self.criterion == "msp":
            return np.exp(log_mean.max(axis=1))
        total_neg_entropy = np.sum(np.exp(log_mean) * log_mean, axis=1)
        if self.criterion == "entropy":
            return total_neg_entropy
        # I = H[p̄] − E_t H[p_t]; score −I
        return total_neg_entropy - per_pass_neg_entropy
