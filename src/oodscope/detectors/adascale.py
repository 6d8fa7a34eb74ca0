"""AdaSCALE (Regmi et al., 2025): SCALE with a per-sample percentile chosen from how much a
sample's features move under a small input perturbation.

Both variants re-run the network: one forward/backward pass for the gradient of the
predicted logit w.r.t. the input, one forward pass of the perturbed input. The features are
the input of the classifier head (a forward pre-hook), so any network with a final
``nn.Linear`` works.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np

from .._numeric import array_key, logsumexp
from .._params import store_params
from ..features import Features
from ._checks import check_fraction, check_int, check_real, refuse_unresolved_scores
from ._network import (capture_head_input, check_model, eval_mode, float_inputs, forward_logits,
                       head_of, input_batches)
from .base import Detector, register

__all__ = ["AdaSCALEA", "AdaSCALEL", "adaptive_scale"]

#: The authors' sweep (OpenOOD adascale_a/l configs): every pair p_min < p_max of
#: 60, 65, ..., 95, 99 (36 pairs).
_GRID = (60, 65, 70, 75, 80, 85, 90, 95, 99)
_PERCENTILE_SPACE = [(lo, hi) for i, lo in enumerate(_GRID) for hi in _GRID[i + 1:]]


def adaptive_scale(h: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """``r = Σ relu(h) / Σ top-k relu(h)`` per row, ``k = D − round(D·p/100)`` for each row's
    percentile ``p``; rows whose kept activations sum to 0 get ``r = 0``."""
    a = np.maximum(np.asarray(h, dtype=np.float64), 0.0)
    d = a.shape[1]
    k = d - np.round(d * np.asarray(percentiles, dtype=np.float64) / 100.0).astype(int)
    k = np.clip(k, 1, d)
    top = -np.sort(-a, axis=1)  # descending
    cums = np.cumsum(top, axis=1)
    kept = cums[np.arange(len(a)), k - 1]
    total = a.sum(axis=1)
    return np.divide(total, kept, out=np.zeros_like(total), where=kept > 0)


class _AdaSCALE(Detector):
    """Shared fit (ECDF of the feature-shift statistic on ID data) and scoring.

    For a sample with head input ``h``: the input elements with the *smallest* gradient
    magnitude of the predicted logit (a fraction ``o``) move by ``step · sign(∇)``, giving
    perturbed features ``h̃``. The shift statistic is
    ``Q(x) = Σ_{j ∈ top-k1(h)} relu(h̃_j) + λ Σ_{j ∈ top-k2(h)} |h_j − h̃_j|``
    (``k1``, ``k2`` in percent of the feature width, at least one unit). ``fit`` stores the
    sorted ``Q`` of ``n_samples`` ID training samples; a test sample's percentile is
    ``p = p_min + (1 − ECDF(Q(x))) (p_max − p_min)`` (a larger ``Q`` gives a percentile closer
    to ``p_min``). The scale ``r`` is SCALE's ratio at that percentile (`adaptive_scale`); the
    variants differ in where it is applied. Perturbation, ``Q``, the ECDF and the defaults
    (``k1 = 5``, ``k2 = 1``, ``λ = 10``, ``o = 5%``, step 0.5 in the network's input units,
    5000 fit samples, percentiles (75, 85), the 36-pair sweep) follow the authors' OpenOOD
    postprocessor; it fits the ECDF on ID validation images, ``fit`` here on the Features it
    is given. Elements with a zero gradient are not moved (``sign(0) = 0``, as there).
    """

    requires = frozenset({"model", "inputs"})
    fit_fields = frozenset({"inputs"})
    search_space: ClassVar[dict[str, list[Any]]] = {"percentile": _PERCENTILE_SPACE}
    score_params = frozenset({"percentile"})
    transient_state = frozenset({"_shift_cache_"})
    reference = (
        "Regmi et al., AdaSCALE: Adaptive Scaling for OOD Detection, arXiv:2503.08023, 2025 "
        "(OpenOOD adascale_a / adascale_l)"
    )

    def __init__(self, model: Any = None, percentile: tuple = (75, 85), k1: float = 5.0,
                 k2: float = 1.0, lmbda: float = 10.0, o: float = 0.05, step: float = 0.5,
                 n_samples: int | None = 5000, random_state: int = 0, batch_size: int = 128):
        store_params(self, locals())

    # ------------------------------------------------------------ checks
    def _percentiles(self) -> tuple[float, float]:
        p = self.percentile
        ok = (isinstance(p, (tuple, list)) and len(p) == 2
              and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in p)
              and 0 < p[0] <= p[1] < 100)
        if not ok:
            raise ValueError(
                f"{type(self).__name__}: percentile must be a pair (p_min, p_max) with "
                f"0 < p_min <= p_max < 100, got {p!r}."
            )
        return float(p[0]), float(p[1])

    def _check_params(self) -> None:
        check_model(self, self.model)
        self._percentiles()
        for name in ("k1", "k2"):  # percent of the feature width
            check_real(self, name, getattr(self, name), strict=True)
            if getattr(self, name) > 100:
                raise ValueError(f"{type(self).__name__}: {name} is a percentage in (0, 100], got {getattr(self, name)!r}.")
        check_fraction(self, "o", self.o)
        check_real(self, "lmbda", self.lmbda)
        check_real(self, "step", self.step)
        if self.n_samples is not None:
            check_int(self, "n_samples", self.n_samples, low=2)
        check_int(self, "batch_size", self.batch_size)

    # ------------------------------------------------------------ network passes
    def features_and_shift(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(h, Q)``: head inputs (N, D) and the shift statistic (N,), float64."""
        import torch

        model = self.model
        _, head = head_of(self, model)
        feats, shifts = [], []
        with eval_mode(model):
            for _, xt in input_batches(inputs, self.batch_size, model):
                xt = xt.detach().requires_grad_(True)
                with capture_head_input(model, head) as cap, torch.enable_grad():
                    logits = forward_logits(model, xt)
                    pred = logits.detach().argmax(dim=1)
                    picked = logits.gather(1, pred[:, None]).sum()
                    (grad,) = torch.autograd.grad(picked, xt)
                h = cap["h"].detach().reshape(len(xt), -1)
                flat = grad.reshape(len(xt), -1)
                n_move = int(flat.shape[1] * float(self.o))
                moved = xt.detach().clone().reshape(len(xt), -1)
                if n_move > 0:
                    idx = torch.topk(flat.abs(), n_move, dim=1, largest=False).indices
                    moved.scatter_add_(1, idx, float(self.step) * torch.sign(flat.gather(1, idx)))
                with capture_head_input(model, head) as cap, torch.no_grad():
                    forward_logits(model, moved.reshape(xt.shape))
                h_moved = cap["h"].detach().reshape(len(xt), -1)
                feats.append(h.double().cpu().numpy())
                shifts.append(self._shift(h.double(), h_moved.double()).cpu().numpy())
        return np.concatenate(feats), np.concatenate(shifts)

    def _shift(self, h, h_moved):
        import torch

        d = h.shape[1]
        k1 = max(1, int(d * float(self.k1) / 100.0))
        k2 = max(1, int(d * float(self.k2) / 100.0))
        top1 = torch.topk(h, k1, dim=1).indices
        top2 = torch.topk(h, k2, dim=1).indices
        kept = torch.relu(h_moved).gather(1, top1).sum(dim=1)
        moved = (h - h_moved).abs().gather(1, top2).sum(dim=1)
        return kept + float(self.lmbda) * moved

    def _cached(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`features_and_shift` of the last few query sets (percentile candidates share them)."""
        cache = self.__dict__.get("_shift_cache_")
        key = array_key(inputs)
        if cache is not None and key in cache:
            return cache[key]
        value = self.features_and_shift(inputs)
        if cache is not None:
            cache[key] = value
            while len(cache) > 4:
                cache.pop(next(iter(cache)))
        return value

    # ------------------------------------------------------------ fit / score
    def _fit(self, train: Features) -> None:
        inputs = float_inputs(self, train)
        n = len(inputs)
        rows = np.arange(n)
        if self.n_samples is not None and int(self.n_samples) < n:
            rows = np.sort(np.random.default_rng(self.random_state).permutation(n)[: int(self.n_samples)])
        _, shift = self.features_and_shift(inputs[rows])
        self.fit_shifts_ = np.sort(shift)
        self._shift_cache_: dict = {}

    def sample_percentiles(self, shift: np.ndarray) -> np.ndarray:
        lo, hi = self._percentiles()
        ecdf = np.searchsorted(self.fit_shifts_, shift, side="right") / len(self.fit_shifts_)
        return lo + (1.0 - ecdf) * (hi - lo)

    def _score(self, x: Features) -> np.ndarray:
        inputs = float_inputs(self, x)
        h, shift = self._cached(inputs)
        r = adaptive_scale(h, self.sample_percentiles(shift))
        _, head = head_of(self, self.model)
        w = head.weight.detach().double().cpu().numpy()
        b = (np.zeros(w.shape[0]) if head.bias is None else head.bias.detach().double().cpu().numpy())
        scores = logsumexp(self._logits(h @ w.T, b, r), axis=1)
        refuse_unresolved_scores(type(self).__name__, scores, inputs, "extras['inputs']")
        return scores

    def _logits(self, wh: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register("adascale_a")
class AdaSCALEA(_AdaSCALE):
    """AdaSCALE-A: activation scaling, energy of ``W (h · e^r) + b`` (SCALE's feature factor
    with the adaptive percentile). See `_AdaSCALE` for the percentile."""

    __doc__ = (__doc__ or "") + "\n" + (_AdaSCALE.__doc__ or "")

    def _logits(self, wh, b, r):
        return wh * np.exp(r)[:, None] + b


@register("adascale_l")
class AdaSCALEL(_AdaSCALE):
    """AdaSCALE-L: logit scaling, energy of ``(W h + b) · r²``. Rows with ``r = 0`` (no
    positive activation) keep their logits."""

    __doc__ = (__doc__ or "") + "\n" + (_AdaSCALE.__doc__ or "")

    def _logits(self, wh, b, r):
        factor = np.where(r > 0, r**2, 1.0)
        return (wh + b) * factor[:, None]
