"""SDM: the Similarity-Distance-Magnitude activation and its calibrated selective decision.

Schmaltz, "Similarity-Distance-Magnitude Universal Verification" (arXiv 2502.20167; code
ReexpressAI/sdm). A softmax replacement whose base and exponent say how much the training
data supports the prediction:

* **Similarity** ``q``: walking through the training (support) set from the nearest point
  outward, the number of consecutive neighbours that were predicted correctly *and* with
  the test point's predicted class ``ŷ`` (the count stops at the first neighbour that is
  not; capped at ``max_q``).
* **Distance** ``d``: ``d_0`` is the L2 distance to the nearest support point;
  ``d = min_c (1 − eCDF_c(d_0))`` with the class-wise eCDFs of ``d_0`` over calibration
  points with ``q > 0`` (in (0, 1]; 0 far from the training data).
* **Magnitude**: the logits ``z``.

``sdm(z)_i = (2+q)^(d·z_i) / Σ_c (2+q)^(d·z_c)``: softmax at ``q = e−2, d = 1``, uniform at
``d = 0``. Calibration then turns it into a class-conditional estimate: ``v_c`` = eCDF of
``sdm(z)_c`` over calibration points of true class ``c``; ``q̃ = v_ŷ · ln(2+q)`` (the
"soft q bin", 0 when the sdm argmax disagrees with ``ŷ``); a bias-free linear rescaler ``W``
(trained on calibration with the sdm log-loss in base ``2+q̃``) gives
``p̂ = sdm_{q̃, d=1}(W v)``. The DKW inequality widens ``v`` by
``ε_c = sqrt(ln(2/(1−α)) / (2 n_c))`` (``n_c`` = class-``c`` calibration points with a lower
``q̃``), giving the lower estimate ``p̂_lower``. Thresholds (the paper's Alg. 3) are the
``1−α`` quantiles of ``p̂`` on the true class among calibration points with
``q̃ ≥ b`` and no OOD flag, for the lowest bin ``b`` where every class reaches ``α``. A point is
**admitted** iff it is not OOD (``⌊q̃⌋ ≥ 1``, no argmax flip), ``q̃ ≥ b`` and the prediction set
``{c : p̂_lower,c ≥ threshold_c}`` is exactly ``{ŷ}``; otherwise the model abstains.

The detector's **score is ``p̂_lower(ŷ | x)``** (higher = more in-distribution / more
trustworthy); `SDM.predict` returns everything (q, d, the sdm output, p̂, p̂_lower, the
admit decision). `oodscope.selective` turns it into a risk-coverage curve.

Deviations from the paper, all for working on frozen `Features` in a few seconds:

* no exemplar adaptor: the paper trains a 1-D CNN over frozen hidden states, with the sdm
  loss, and searches neighbours in its output; here ``h'`` are the given penultimate
  ``features`` and ``z'`` the given ``logits`` (the network *is* the adaptor);
* one support/calibration split, not J = 10, and so no iterated Cauchy magnitude offset
  across splits. As in the paper, ``fit(train, calibration=held_out)`` uses all of ``train``
  as the support set and calibrates on held-out labelled data; ``fit(train)`` alone splits
  ``train`` at random (``calibration_fraction``), which calibrates on data the network was
  trained on and so admits more than it should;
* the rescaler is fitted by full-batch L-BFGS from the identity with a small ridge
  (``rescaler_ridge``), not Adam at batch size 1 with early stopping (the loss is convex
  in ``W``; the ridge keeps it bounded when calibration is separable);
* exact brute-force neighbours (float64) instead of FAISS, and at most ``max_bins``
  candidate bins in the threshold search (quantiles of ``q̃`` when there are more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._numeric import array_key, logsumexp, remember
from .._params import store_params
from ..features import Features
from ._stats import iter_chunks
from .base import Detector, register

__all__ = ["SDM", "SDMOutput", "sdm_activation", "similarity_distance"]

_Q_OFFSET = 2.0


def sdm_activation(logits: np.ndarray, q: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
    """``(2+q)^(d·z) / Σ (2+q)^(d·z)`` row-wise, in float64 through log-sum-exp.

    ``q`` and ``d`` are per-row (``(N,)``); ``d=None`` means 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(-1, 1)
    scale = np.log(_Q_OFFSET + q)
    if d is not None:
        scale = scale * np.asarray(d, dtype=np.float64).reshape(-1, 1)
    t = scale * z
    return np.exp(t - logsumexp(t, axis=1, keepdims=True))


def similarity_distance(features: np.ndarray, predicted: np.ndarray, support: np.ndarray,
                        support_good: np.ndarray, support_pred: np.ndarray, max_q: int,
                        chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(q, d_0)`` of each row against the support set (brute force, float64).

    ``q`` counts the nearest support points, in order of distance, that are correctly
    predicted (``support_good``) and predicted as the row's ``predicted`` class, up to the
    first that is not: it equals the number of such points closer than the nearest
    non-matching one. Capped at ``max_q``. ``d_0`` is the distance to the nearest point.
    """
    x = np.asarray(features, dtype=np.float64)
    s = np.asarray(support, dtype=np.float64)
    s_sq = np.einsum("ij,ij->i", s, s)
    q = np.zeros(len(x), dtype=np.int64)
    d0 = np.zeros(len(x), dtype=np.float64)
    classes = np.unique(predicted)
    match = {int(c): support_good & (support_pred == c) for c in classes}
    for sl in iter_chunks(len(x), chunk_size or 256):
        xc = x[sl]
        dist = np.maximum(np.einsum("ij,ij->i", xc, xc)[:, None] + s_sq[None, :] - 2.0 * xc @ s.T, 0.0)
        d0[sl] = np.sqrt(dist.min(axis=1))
        pc = predicted[sl]
        for c in np.unique(pc):
            rows = np.flatnonzero(pc == c)
            m = match[int(c)]
            dr = dist[rows]
            stop = dr[:, ~m].min(axis=1) if (~m).any() else np.full(len(rows), np.inf)
            q[sl.start + rows] = (dr[:, m] < stop[:, None]).sum(axis=1) if m.any() else 0
    return np.minimum(q, max_q), d0


def _grouped(values: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Values sorted within each group, concatenated, with ``offsets`` (``n_groups + 1``)."""
    order = np.lexsort((values, groups))
    counts = np.bincount(groups, minlength=n_groups)
    return values[order].astype(np.float64), np.r_[0, np.cumsum(counts)].astype(np.int64)


def _ecdf_index(sorted_vals: np.ndarray, offsets: np.ndarray, c: int, x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(count of class-c values < x, class size)`` (np.searchsorted, side='left')."""
    block = sorted_vals[offsets[c]:offsets[c + 1]]
    return np.searchsorted(block, x, side="left"), block.size


@dataclass
class SDMOutput:
    """Everything the SDM estimator says about a batch (arrays of length N unless noted)."""

    prediction: np.ndarray        #: ŷ = argmax of the logits
    q: np.ndarray                 #: Similarity (count of matching nearest neighbours)
    d0: np.ndarray                #: distance to the nearest support point
    d: np.ndarray                 #: Distance quantile in [0, 1]
    sdm: np.ndarray               #: (N, C) sdm activation output
    soft_qbin: np.ndarray         #: q̃ = v_ŷ · ln(2+q) (0 when flagged OOD)
    calibrated: np.ndarray        #: (N, C) p̂, the rescaled class-conditional estimate
    lower: np.ndarray             #: (N, C) p̂_lower (DKW-widened)
    is_ood: np.ndarray            #: ⌊q̃⌋ = 0 or an argmax flip
    admitted: np.ndarray          #: the selective decision: True = answer, False = abstain

    @property
    def confidence(self) -> np.ndarray:
        """``p̂_lower(ŷ | x)``, the detector's score."""
        return self.lower[np.arange(len(self.prediction)), self.prediction]


@register("sdm")
class SDM(Detector):
    """Similarity-Distance-Magnitude calibration (score = ``p̂_lower(ŷ|x)``; see the module doc).

    Parameters
    ----------
    alpha : the target class-conditional accuracy α′ of the admit decision (paper: 0.95).
    calibration_fraction : share of the training Features held out for calibration; the rest
        is the support set searched for neighbours.
    max_q : cap on the Similarity count (the paper indexes 1000 neighbours).
    rescaler_iters, rescaler_ridge : L-BFGS iterations and L2 penalty ``ridge·‖W−I‖²/2``.
    max_bins : candidate q̃ bins tried by the threshold search.
    distance_mode : ``"min"`` (the paper and its code): ``d = min_c (1 − eCDF_c(d_0))`` over
        every class; ``"predicted"``: the predicted class's eCDF only. With many classes and
        few calibration points per class the minimum is 0 for most inputs (some class has a
        small largest distance), which flattens the output: measured on CLINC150 (150
        classes, 20 calibration points each) the median ID ``d`` was 0. Not in the paper.
    seed : the support/calibration split.
    """

    requires = frozenset({"logits", "features"})
    fit_fields = frozenset({"logits", "features", "labels"})
    search_space = {"alpha": [0.9, 0.95, 0.99], "calibration_fraction": [0.3, 0.5]}
    # alpha only sets the DKW widening at score time and the admit thresholds, which are
    # recomputed from the stored calibration outputs: candidates share the fit
    score_params = frozenset({"alpha"})
    transient_state = frozenset({"_threshold_cache_", "_similarity_cache_"})
    _CACHE_ENTRIES = 4
    reference = (
        "Schmaltz, Similarity-Distance-Magnitude Universal Verification, arXiv 2502.20167 "
        "(2025); code ReexpressAI/sdm"
    )
    min_fit_samples = 4

    def __init__(self, alpha: float = 0.95, calibration_fraction: float = 0.5, max_q: int = 1000,
                 rescaler_iters: int = 200, rescaler_ridge: float = 1e-3, max_bins: int = 500,
                 distance_mode: str = "min", seed: int = 0, chunk_size: int | None = None):
        store_params(self, locals())

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.5 < float(self.alpha) < 1.0):
            raise ValueError(f"alpha must be in (0.5, 1) (the target accuracy, e.g. 0.95), got {self.alpha!r}.")
        if not (isinstance(self.calibration_fraction, float) and 0.0 < self.calibration_fraction < 1.0):
            raise ValueError("calibration_fraction must be a float in (0, 1), got "
                             f"{self.calibration_fraction!r}.")
        for name in ("max_q", "rescaler_iters", "max_bins"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.distance_mode not in ("min", "predicted"):
            raise ValueError(f"distance_mode must be 'min' or 'predicted', got {self.distance_mode!r}.")
        if not (isinstance(self.rescaler_ridge, (int, float)) and self.rescaler_ridge >= 0):
            raise ValueError(f"rescaler_ridge must be >= 0, got {self.rescaler_ridge!r}.")

    # ------------------------------------------------------------------ fit
    def _fit(self, train: Features, calibration: Features | None = None) -> None:
        """``calibration``: held-out labelled Features (the paper's calibration split, e.g.
        ID validation data the network was not trained on). Then all of ``train`` is the
        support set; without it ``train`` is split by ``calibration_fraction``."""
        c = int(train.logits.shape[1])
        if c < 2:
            raise ValueError("SDM needs logits over at least 2 classes.")
        feats = np.asarray(train.features, dtype=np.float64)
        logits = np.asarray(train.logits, dtype=np.float64)
        labels = train.labels
        if calibration is None:
            n = len(train)
            perm = np.random.default_rng(self.seed).permutation(n)
            n_cal = min(max(int(round(self.calibration_fraction * n)), 1), n - 2)
            cal, sup = perm[:n_cal], perm[n_cal:]
            cal_feats, z, y = feats[cal], logits[cal], labels[cal]
            feats, logits, labels = feats[sup], logits[sup], labels[sup]
        else:
            cal_feats, z, y = self._calibration_arrays(calibration, train)
        self.num_classes_ = c
        self.support_features_ = feats
        self.support_pred_ = logits.argmax(axis=1)
        self.support_good_ = self.support_pred_ == labels

        pred = z.argmax(axis=1)
        q, d0 = self._similarity(cal_feats, pred)
        keep = q > 0  # q = 0: no similar point, the distance quantile is undefined (OOD)
        self.d_cdf_, self.d_offsets_ = _grouped(d0[keep], y[keep], c)
        d = self._distance_quantile(d0, pred)
        sdm = sdm_activation(z, q, d)
        flipped = sdm.argmax(axis=1) != pred
        q_eff = np.where(flipped, 0, q)
        self.out_cdf_, self.out_offsets_ = _grouped(sdm[np.arange(len(y)), y], y, c)
        v = self._output_quantiles(sdm)
        soft = v[np.arange(len(y)), pred] * np.log(_Q_OFFSET + q_eff)
        self.rescaler_ = self._train_rescaler(v, soft, y)
        self.qbin_cdf_, self.qbin_offsets_ = _grouped(soft, y, c)
        p_hat = sdm_activation(v @ self.rescaler_.T, soft)
        # what the admit thresholds of any alpha are computed from (see `_admit_rule`)
        self.calibration_p_true_ = p_hat[np.arange(len(y)), y]
        self.calibration_qbin_ = soft
        self.calibration_labels_ = np.asarray(y, dtype=np.int64)
        self.calibration_ood_ = (np.floor(soft) <= 0) | (p_hat.argmax(axis=1) != pred)
        # shared by shallow copies (the tuner's alpha candidates); emptied by a refit
        self._threshold_cache_: dict[float, tuple[np.ndarray, float, bool]] = {}
        self._similarity_cache_: dict[Any, tuple[np.ndarray, np.ndarray]] = {}

    def _calibration_arrays(self, cal, train: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ..features import as_features

        cal = as_features(cal)
        cal.require(self.fit_fields, "SDM.fit(calibration=...)")
        self._check_finite(cal, self.fit_fields, "fit(calibration=...)")
        for field in ("features", "logits"):
            if getattr(cal, field).shape[1] != getattr(train, field).shape[1]:
                raise ValueError(f"SDM.fit: calibration {field} have width {getattr(cal, field).shape[1]} but "
                                 f"train {field} {getattr(train, field).shape[1]}; use Features of the same model.")
        labels = np.asarray(cal.labels)
        if len(cal) < 2 or labels.min() < 0 or labels.max() >= train.logits.shape[1]:
            raise ValueError("SDM.fit: calibration needs at least 2 samples with in-distribution labels in "
                             f"[0, {train.logits.shape[1]}); got {len(cal)} samples, labels "
                             f"{labels.min() if len(cal) else None}..{labels.max() if len(cal) else None}.")
        return (np.asarray(cal.features, dtype=np.float64), np.asarray(cal.logits, dtype=np.float64), labels)

    def _similarity(self, feats: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return similarity_distance(feats, pred, self.support_features_, self.support_good_,
                                   self.support_pred_, int(self.max_q), self.chunk_size)

    def _distance_quantile(self, d0: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """``min_c (1 − eCDF_c(d_0))`` (``distance_mode="predicted"``: class ``ŷ`` only); a
        class without calibration distances gives 0 (as the reference code: nothing is known
        to be close for that class)."""
        per_class = np.empty((len(d0), self.num_classes_))
        for k in range(self.num_classes_):
            idx, size = _ecdf_index(self.d_cdf_, self.d_offsets_, k, d0)
            per_class[:, k] = 1.0 - idx / size if size else 0.0
        if self.distance_mode == "predicted":
            return per_class[np.arange(len(d0)), pred]
        return per_class.min(axis=1)

    def _output_quantiles(self, sdm: np.ndarray) -> np.ndarray:
        """``v_c`` = eCDF of ``sdm_c`` over calibration points of true class ``c`` (1 at or
        above the largest value; 0 for a class without calibration points)."""
        v = np.zeros_like(sdm)
        for k in range(self.num_classes_):
            block = self.out_cdf_[self.out_offsets_[k]:self.out_offsets_[k + 1]]
            if block.size:
                v[:, k] = np.where(sdm[:, k] >= block[-1], 1.0,
                                   np.searchsorted(block, sdm[:, k], side="left") / block.size)
        return v

    def _train_rescaler(self, v: np.ndarray, soft: np.ndarray, y: np.ndarray) -> np.ndarray:
        """W minimising mean ``−log_{2+q̃} sdm_{q̃}(W v)_y + ridge·‖W − I‖²/2`` (convex)."""
        from scipy.optimize import minimize

        c = self.num_classes_
        log_base = np.log(_Q_OFFSET + soft)[:, None]
        onehot = np.eye(c)[y]
        eye = np.eye(c)
        ridge = float(self.rescaler_ridge)

        def loss_grad(w_flat):
            w = w_flat.reshape(c, c)
            a = v @ w.T
            t = log_base * a
            lse = logsumexp(t, axis=1, keepdims=True)
            loss = np.mean(-(a * onehot).sum(1) + lse[:, 0] / log_base[:, 0])
            p = np.exp(t - lse)
            grad = (p - onehot).T @ v / len(v)
            loss += 0.5 * ridge * np.sum((w - eye) ** 2)
            grad += ridge * (w - eye)
            return loss, grad.ravel()

        res = minimize(loss_grad, eye.ravel(), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(self.rescaler_iters)})
        return res.x.reshape(c, c)

    @property
    def thresholds_(self) -> np.ndarray:
        """Per-class thresholds on ``p̂_lower`` of the admit decision (for ``alpha``)."""
        return self._admit_rule()[0]

    @property
    def min_qbin_(self) -> float:
        """The lowest q̃ bin admitted (inf when no bin reaches ``alpha``)."""
        return self._admit_rule()[1]

    @property
    def threshold_found_(self) -> bool:
        """Whether some q̃ bin reaches ``alpha`` for every class (else nothing is admitted)."""
        return self._admit_rule()[2]

    def _admit_rule(self) -> tuple[np.ndarray, float, bool]:
        if "calibration_p_true_" not in self.__dict__:
            raise AttributeError("SDM is not fitted: the admit thresholds come from fit's calibration.")
        cache = self.__dict__.setdefault("_threshold_cache_", {})
        alpha = float(self.alpha)
        if alpha not in cache:
            remember(cache, alpha, self._thresholds(alpha), self._CACHE_ENTRIES)
        return cache[alpha]

    def _thresholds(self, alpha: float) -> tuple[np.ndarray, float, bool]:
        """The paper's Alg. 3: the lowest q̃ bin at which every class's ``1 − α`` quantile of
        ``p̂`` on the true class (non-OOD calibration points with q̃ >= bin) reaches α."""
        c = self.num_classes_
        soft, y, true_p = self.calibration_qbin_, self.calibration_labels_, self.calibration_p_true_
        ok = ~self.calibration_ood_
        bins = np.unique(soft[ok])
        if bins.size > self.max_bins:
            bins = np.unique(np.quantile(soft[ok], np.linspace(0, 1, self.max_bins), method="lower"))
        for b in bins:
            sel = ok & (soft >= b)
            thr = np.zeros(c)
            for k in range(c):
                vals = np.sort(true_p[sel & (y == k)])
                if vals.size:
                    thr[k] = max(vals[min(int((1.0 - alpha) * vals.size), vals.size - 1)], 0.0)
            if np.all(thr >= alpha):
                return thr, float(b), True
        return np.zeros(c), float("inf"), False

    # ------------------------------------------------------------------ inference
    def predict(self, x: Features) -> SDMOutput:
        """The full SDM estimate for ``x``: q, d, sdm output, p̂, p̂_lower, OOD flag, admit."""
        self.score(x)  # validates the input; _score leaves the full output behind
        out, self._last_output = self._last_output, None
        return out

    def _predict(self, x: Features) -> SDMOutput:
        z = np.asarray(x.logits, dtype=np.float64)
        n, rows = len(z), np.arange(len(z))
        pred = z.argmax(axis=1)
        q, d0 = self._query_similarity(x.features, pred)
        d = self._distance_quantile(d0, pred)
        sdm = sdm_activation(z, q, d)
        sdm_pred = sdm.argmax(axis=1)
        q_eff = np.where(sdm_pred != pred, 0, q)
        log_q = np.log(_Q_OFFSET + q_eff)
        v = self._output_quantiles(sdm)
        soft = v[rows, pred] * log_q
        p_hat = sdm_activation(v @ self.rescaler_.T, soft)
        soft_c = np.where(p_hat.argmax(axis=1) != sdm_pred, 0.0, soft)
        eps = self._dkw_errors(soft_c, n)
        v_low = np.clip(v + eps, 0.0, 1.0)
        v_low[rows, pred] = np.clip(v[rows, pred] - eps[rows, pred], 0.0, 1.0)
        soft_low = v_low[rows, pred] * log_q
        p_low = sdm_activation(v_low @ self.rescaler_.T, soft_low)
        flip = p_low.argmax(axis=1) != sdm_pred
        soft_low = np.where(flip, 0.0, soft_low)
        is_ood = flip | (np.floor(soft_low) <= 0)
        admitted = np.zeros(n, dtype=bool)
        if self.threshold_found_:
            in_set = p_low >= self.thresholds_[None, :]
            singleton = (in_set.sum(axis=1) == 1) & in_set[rows, pred]
            admitted = ~is_ood & (soft_low >= self.min_qbin_) & singleton
        return SDMOutput(prediction=pred, q=q, d0=d0, d=d, sdm=sdm, soft_qbin=soft_low,
                         calibrated=p_hat, lower=p_low, is_ood=is_ood, admitted=admitted)

    def _query_similarity(self, features: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(q, d_0)`` of query rows; kept for the last few query sets (keyed by their
        bytes), so the tuner's alpha candidates search the support set once per split."""
        feats = np.ascontiguousarray(features)
        key = array_key(feats, pred)
        cache = self.__dict__.get("_similarity_cache_")
        if cache is not None and key in cache:
            q, d0 = cache[key]
            return q.copy(), d0.copy()
        q, d0 = self._similarity(np.asarray(feats, dtype=np.float64), pred)
        if cache is not None:
            remember(cache, key, (q.copy(), d0.copy()), self._CACHE_ENTRIES)
        return q, d0

    def _dkw_errors(self, soft: np.ndarray, n: int) -> np.ndarray:
        """``ε_c = sqrt(ln(2/(1−α)) / (2 n_c))`` with ``n_c`` the class-c calibration points
        whose q̃ is below this one's (1 when there are none)."""
        eps = np.ones((n, self.num_classes_))
        level = np.log(2.0 / (1.0 - float(self.alpha)))
        for k in range(self.num_classes_):
            idx, size = _ecdf_index(self.qbin_cdf_, self.qbin_offsets_, k, soft)
            m = np.minimum(idx, size - 1)
            eps[:, k] = np.where(m > 0, np.sqrt(level / (2.0 * np.maximum(m, 1))), 1.0)
        return eps

    def _score(self, x: Features) -> np.ndarray:
        out = self._predict(x)
        self._last_output = out  # for predict(); not fitted state (no trailing underscore)
        return out.confidence

    def selective_summary(self, x: Features) -> dict[str, Any]:
        """Coverage and accuracy of the admit decision on labelled in-distribution ``x``
        (``admitted_accuracy`` is None when nothing is admitted)."""
        from ..selective import correct_predictions

        out = self.predict(x)
        correct = correct_predictions(out.prediction, x.labels)
        cov = float(out.admitted.mean())
        acc = float(correct[out.admitted].mean()) if out.admitted.any() else None
        return {"coverage": cov, "admitted_accuracy": acc, "accuracy": float(correct.mean()),
                "threshold_found": bool(self.threshold_found_), "min_qbin": float(self.min_qbin_)}
