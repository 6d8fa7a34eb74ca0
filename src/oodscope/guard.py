"""`Guard`: a detector with a calibrated accept/reject threshold, ready to ship.

>>> guard = oodscope.Guard("knn", tpr=0.95).fit(train, val=id_val)
>>> guard.predict(x)            # True = accept (in-distribution)
>>> guard.p_values(x)           # conformal p-values against the ID calibration scores
>>> guard.save("guard/"); oodscope.load("guard/")

Calibration uses held-out in-distribution scores ``s_1..s_n`` (never the data the
detector was fitted on: a k-NN bank matches itself). The p-value of a new input with
score ``s`` is the marginal conformal p-value (Bates et al., "Testing for outliers with
conformal p-values", Ann. Statist. 2023)::

    p(s) = (1 + #{i : s_i <= s}) / (n + 1)

which is uniform on ``{1/(n+1), ..., 1}`` for an exchangeable in-distribution input.

* ``tpr`` mode: accept when ``p(s) > 1 − tpr``. That is ``s >= threshold_`` with
  ``threshold_`` the ``m``-th smallest calibration score, ``m = floor((1 − tpr)(n + 1))``,
  and an in-distribution input is rejected with probability ``m/(n + 1) <= 1 − tpr``.
* ``fpr`` mode (OOD calibration scores ``o_1..o_k`` given): accept when the OOD conformal
  p-value ``(1 + #{j : o_j >= s})/(k + 1) <= fpr``, so an input from the calibration OOD
  distribution is accepted with probability at most ``fpr``; the ID acceptance rate that
  results is reported.

The threshold's own uncertainty is a percentile bootstrap interval over the calibration
scores (``threshold_ci_``). `monitor` tracks the live rejection rate against the
calibrated one (`oodscope.monitor.RejectionMonitor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import persistence
from .detectors.base import Detector, create
from .features import Features, as_features
from .monitor import RejectionMonitor

__all__ = ["Guard"]

_EPS = 1e-9  # keeps floor((1 - 0.95) * 1000) at 50, not 49, despite 1 - 0.95 = 0.04999...


class Guard:
    """A detector plus a calibrated threshold.

    Parameters
    ----------
    detector : a registered name (``"knn"``) or a `Detector` instance (fitted or not).
    tpr : target fraction of in-distribution inputs accepted (default 0.95).
    fpr : instead of ``tpr``, the largest fraction of OOD inputs accepted; needs OOD
        calibration data (``fit(..., ood_val=...)``).
    detector_params : hyperparameters when ``detector`` is a name.
    calibration_split : when ``fit`` gets no ``val``, this fraction of ``train`` is held out
        (seeded) for calibration and the detector is fitted on the rest.
    n_boot, ci_level : bootstrap resamples and level of ``threshold_ci_``.
    seed : for the calibration split and the bootstrap.
    """

    def __init__(self, detector: str | Detector = "knn", *, tpr: float | None = 0.95,
                 fpr: float | None = None, detector_params: dict[str, Any] | None = None,
                 calibration_split: float = 0.2, n_boot: int = 1000, ci_level: float = 0.95,
                 seed: int = 0):
        if fpr is not None:
            tpr = None
        if (tpr is None) == (fpr is None):
            raise ValueError("Give exactly one of tpr= (ID acceptance) or fpr= (OOD acceptance).")
        for name, v in (("tpr", tpr), ("fpr", fpr)):
            if v is not None and not (isinstance(v, (int, float)) and 0.0 < v < 1.0):
                raise ValueError(f"{name} must be in (0, 1), got {v!r}.")
        if not 0.0 < calibration_split < 1.0:
            raise ValueError(f"calibration_split must be in (0, 1), got {calibration_split}.")
        if int(n_boot) != n_boot or n_boot < 0:
            raise ValueError(f"n_boot must be an integer >= 0, got {n_boot}.")
        if not 0.0 < ci_level < 1.0:
            raise ValueError(f"ci_level must be in (0, 1), got {ci_level}.")
        if isinstance(detector, Detector):
            if detector_params:
                detector = detector.clone(**detector_params)
        elif isinstance(detector, str):
            detector = create(detector, **(detector_params or {}))
        else:
            raise TypeError(f"detector must be a name or a Detector, got {type(detector).__name__}.")
        self.detector = detector
        self.tpr = None if tpr is None else float(tpr)
        self.fpr = None if fpr is None else float(fpr)
        self.calibration_split = float(calibration_split)
        self.n_boot = int(n_boot)
        self.ci_level = float(ci_level)
        self.seed = int(seed)

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Features | None = None, val: Features | None = None,
            ood_val: Features | None = None) -> "Guard":
        """Fit the detector on ``train`` and calibrate on ``val`` (held-out ID).

        Without ``val``, a seeded ``calibration_split`` of ``train`` is held out. Detectors
        that learn nothing (``fit_fields is None``, e.g. MSP) may get ``train=None``."""
        needs_data = type(self.detector).fit_fields is not None
        if val is None:
            if train is None:
                raise ValueError("Guard.fit needs held-out in-distribution data: fit(train, val=...).")
            train, val = self._split(as_features(train))
        if needs_data and train is None:
            raise ValueError(f"{type(self.detector).__name__} learns from data: fit(train, val=...).")
        self.detector.fit(train if needs_data else None)
        return self.calibrate(val, ood_val)

    def _split(self, train: Features) -> tuple[Features, Features]:
        n = len(train)
        n_cal = int(round(self.calibration_split * n))
        if n_cal < 1 or n - n_cal < 2:
            raise ValueError(f"Cannot hold out {self.calibration_split:.0%} of {n} training samples "
                             "for calibration; pass val= explicitly.")
        perm = np.random.default_rng(self.seed).permutation(n)
        cal, fit = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        self.calibration_source_ = f"held-out {n_cal} of {n} training samples (calibration_split)"
        return train[fit], train[cal]

    def calibrate(self, val: Features, ood_val: Features | None = None) -> "Guard":
        """Set the threshold from held-out ID scores (and OOD scores in ``fpr`` mode) of the
        already fitted detector."""
        if not self.detector.is_fitted:
            raise ValueError("Fit the detector first (Guard.fit, or pass a fitted detector).")
        if self.fpr is not None and ood_val is None:
            raise ValueError("A Guard with fpr= needs OOD calibration data: fit(..., ood_val=...).")
        id_scores = self._fresh_scores(val)
        ood_scores = None if ood_val is None else self._fresh_scores(ood_val)
        self._set_calibration(id_scores, ood_scores)
        if not hasattr(self, "calibration_source_"):
            self.calibration_source_ = f"{len(id_scores)} held-out ID samples (val)"
        return self

    def _fresh_scores(self, x: Features) -> np.ndarray:
        self.detector.reset()  # a stateful detector calibrates from an empty memory
        return self.detector.score(x)

    def _set_calibration(self, id_scores: np.ndarray, ood_scores: np.ndarray | None) -> None:
        s = np.sort(np.asarray(id_scores, dtype=np.float64))
        n = len(s)
        if self.fpr is None:
            m = _tpr_rank(n, self.tpr)
            threshold = s[m - 1]
            boot = self._bootstrap(lambda r: _tpr_threshold(r, self.tpr), s)
        else:
            o = np.sort(np.asarray(ood_scores, dtype=np.float64))
            threshold = _fpr_threshold(o, self.fpr)
            boot = self._bootstrap(lambda r: _fpr_threshold(r, self.fpr), o)
            self.ood_calibration_acceptance_ = float(np.mean(o >= threshold))
        self.calibration_scores_ = s
        self.threshold_ = float(threshold)
        rejected = int(np.searchsorted(s, threshold, side="left"))  # ID scores below it
        self.calibration_tpr_ = 1.0 - rejected / n
        # P(reject) of a new exchangeable ID input: its rank among the n + 1 scores
        self.expected_reject_rate_ = min(rejected + 1, n) / (n + 1)
        if boot is None:
            self.threshold_ci_ = (float("nan"), float("nan"))
        else:
            q = (1.0 - self.ci_level) / 2
            self.threshold_ci_ = tuple(float(v) for v in np.quantile(boot, [q, 1.0 - q]))

    def _bootstrap(self, rule, scores: np.ndarray) -> np.ndarray | None:
        if self.n_boot == 0:
            return None
        rng = np.random.default_rng(self.seed)
        out = np.empty(self.n_boot)
        for i in range(self.n_boot):
            out[i] = rule(np.sort(scores[rng.integers(0, len(scores), len(scores))]))
        return out

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "threshold_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("This Guard is not calibrated yet: call fit(train, val=...) first.")

    # ------------------------------------------------------------------ using
    def score(self, x: Features) -> np.ndarray:
        """The detector's scores (higher = more in-distribution)."""
        self._check_fitted()
        return self.detector.score(x)

    def p_values_of(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values of given scores against the ID calibration scores."""
        self._check_fitted()
        s = self.calibration_scores_
        counts = np.searchsorted(s, np.asarray(scores, dtype=np.float64), side="right")
        return (1.0 + counts) / (len(s) + 1.0)

    def accept_of(self, scores: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return np.asarray(scores, dtype=np.float64) >= self.threshold_

    def p_values(self, x: Features) -> np.ndarray:
        """Marginal conformal p-values; small = unlike the in-distribution calibration data."""
        return self.p_values_of(self.score(x))

    def predict(self, x: Features) -> np.ndarray:
        """Boolean array: True = accept (in-distribution), False = reject."""
        return self.accept_of(self.score(x))

    def decide(self, x: Features) -> dict[str, np.ndarray]:
        """Scores, decisions and p-values from one scoring pass."""
        scores = self.score(x)
        return {"scores": scores, "accept": self.accept_of(scores),
                "p_values": self.p_values_of(scores)}

    def monitor(self, window: int = 1000, alert_level: float = 1e-3, min_samples: int = 100,
                **kwargs: Any) -> RejectionMonitor:
        """A `RejectionMonitor` expecting this guard's calibrated rejection rate."""
        self._check_fitted()
        return RejectionMonitor(self.expected_reject_rate_, window=window, alert_level=alert_level,
                                min_samples=min(min_samples, window), **kwargs)

    def info(self) -> dict[str, Any]:
        """What the guard is and expects, as JSON-able values (the service's ``/info``)."""
        self._check_fitted()
        det = self.detector
        expects = persistence.expected_inputs(det)
        return {
            "detector": type(det).name,
            "params": {k: v for k, v in _jsonable_params(det).items()},
            "mode": "tpr" if self.fpr is None else "fpr",
            "tpr": self.tpr, "fpr": self.fpr,
            "threshold": self.threshold_,
            "threshold_ci": list(self.threshold_ci_), "ci_level": self.ci_level,
            "calibration": {"n": int(len(self.calibration_scores_)),
                            "source": self.calibration_source_,
                            "tpr": self.calibration_tpr_,
                            "expected_reject_rate": self.expected_reject_rate_,
                            **({"ood_acceptance": self.ood_calibration_acceptance_}
                               if self.fpr is not None else {})},
            "fields": expects["fields"], "widths": expects["widths"],
            "stateful": bool(det.stateful),
            "oodscope_version": persistence._version(),
        }

    def __repr__(self) -> str:
        target = f"tpr={self.tpr}" if self.fpr is None else f"fpr={self.fpr}"
        t = f", threshold={self.threshold_:.6g}" if self.is_fitted else ""
        return f"Guard({self.detector!r}, {target}{t})"

    # ------------------------------------------------------------------ persistence
    _SAVED = ("tpr", "fpr", "calibration_split", "n_boot", "ci_level", "seed")
    _FITTED = ("threshold_", "threshold_ci_", "calibration_scores_", "calibration_tpr_",
               "expected_reject_rate_", "calibration_source_", "ood_calibration_acceptance_")

    def save(self, path: str | Path) -> Path:
        """Write the guard (detector + calibration) to the directory ``path``: arrays in
        safetensors, the rest in JSON, a SHA-256 manifest; never pickle."""
        self._check_fitted()
        enc = persistence.Encoder()
        det_doc = enc.detector(self.detector)
        guard = {k: getattr(self, k) for k in self._SAVED}
        guard["state"] = {k: getattr(self, k) for k in self._FITTED if hasattr(self, k)}
        body = {"detector": det_doc, "guard": enc.value(guard, "guard"),
                "expects": persistence.expected_inputs(self.detector), "runtime_params": enc.runtime}
        return persistence.write_bundle(path, persistence.document_for("guard", body), enc.arrays)

    @classmethod
    def load(cls, path: str | Path, **runtime: Any) -> "Guard":
        kind, document, arrays, source = persistence.read_saved(path)
        if kind != "guard":
            raise ValueError(f"{source} holds a {kind}, not a Guard; use oodscope.load.")
        return cls._from_document(document, arrays, source, runtime)

    @classmethod
    def _from_document(cls, document: dict[str, Any], arrays: dict[str, np.ndarray], source: str,
                       runtime: dict[str, Any]) -> "Guard":
        dec = persistence.Decoder(arrays, source, dict(runtime))
        det = dec.detector(document.get("detector"))
        guard = dec.value(document.get("guard"), "guard")
        dec.check_all_used()
        if not isinstance(guard, dict) or not isinstance(guard.get("state"), dict):
            raise ValueError(f"{source}: `guard` must be an object with a `state`.")
        try:
            params = {k: guard[k] for k in cls._SAVED}
        except KeyError as exc:
            raise ValueError(f"{source}: `guard` lacks {exc}.") from None
        try:
            g = cls(det, **{k: v for k, v in params.items() if k != "tpr" or params["fpr"] is None})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid guard parameters: {exc}") from None
        state = guard["state"]
        unknown = sorted(set(state) - set(cls._FITTED))
        missing = sorted(set(cls._FITTED[:6]) - set(state))
        if unknown or missing:
            raise ValueError(f"{source}: guard state has unknown {unknown} / missing {missing}.")
        scores = state["calibration_scores_"]
        if not (isinstance(scores, np.ndarray) and scores.ndim == 1 and len(scores) >= 1
                and np.all(np.isfinite(scores)) and np.all(np.diff(scores) >= 0)):
            raise ValueError(f"{source}: calibration scores must be a sorted finite 1-D array.")
        for k in ("threshold_", "calibration_tpr_", "expected_reject_rate_"):
            if not isinstance(state[k], float) or (k != "threshold_" and not 0 <= state[k] <= 1):
                raise ValueError(f"{source}: guard `{k}` must be a number in range, got {state[k]!r}.")
        for k, v in state.items():
            setattr(g, k, tuple(v) if k == "threshold_ci_" else v)
        expects = document.get("expects")
        if expects != persistence.expected_inputs(det):
            raise ValueError(f"{source}: `expects` does not match the detector's fitted state.")
        return g


# ---------------------------------------------------------------------- thresholds
def _tpr_rank(n: int, tpr: float) -> int:
    """``m``: accept scores at or above the m-th smallest of n calibration scores."""
    m = int(np.floor((1.0 - tpr) * (n + 1) + _EPS))
    if m < 1:
        need = int(np.ceil(1.0 / (1.0 - tpr) - 1.0 - _EPS))
        raise ValueError(f"tpr={tpr} needs at least {need} calibration samples, got {n}: with "
                         "fewer, no threshold rejects anything with that guarantee.")
    return m


def _tpr_threshold(sorted_scores: np.ndarray, tpr: float) -> float:
    return float(sorted_scores[_tpr_rank(len(sorted_scores), tpr) - 1])


def _fpr_threshold(sorted_ood: np.ndarray, fpr: float) -> float:
    k = len(sorted_ood)
    r = int(np.floor(fpr * (k + 1) - 1.0 + _EPS))  # OOD calibration scores allowed above
    if r < 0:
        need = int(np.ceil(1.0 / fpr - 1.0 - _EPS))
        raise ValueError(f"fpr={fpr} needs at least {need} OOD calibration samples, got {k}.")
    if r >= k:
        return float("-inf")
    return float(np.nextafter(sorted_ood[k - 1 - r], np.inf))


def _jsonable_params(det: Detector) -> dict[str, Any]:
    out = {}
    for k, v in det.get_params().items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = f"<{type(v).__name__}>"
    return out
