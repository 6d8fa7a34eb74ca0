"""Drift monitoring: is the rate of rejected inputs still what calibration promised?

A calibrated `oodscope.Guard` rejects in-distribution inputs at a known rate (about
``1 − tpr``). `RejectionMonitor` keeps the decisions of the last ``window`` inputs and
runs a two-sided exact binomial test of their rejection count against that rate: a small
p-value means the stream no longer looks like the calibration data (more rejections: the
inputs drifted away; fewer: the threshold is too loose for what arrives now). It alerts
when the p-value falls below ``alert_level``, once at least ``min_samples`` decisions are
in the window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["RejectionMonitor", "MonitorStatus"]


@dataclass(frozen=True)
class MonitorStatus:
    """One reading of the monitor (all rates are fractions of inputs)."""

    n: int  # decisions in the window
    rejected: int
    rate: float  # observed rejection rate in the window (nan when empty)
    expected_rate: float
    low: float  # the calibrated range: rates outside it alert at this window size
    high: float
    p_value: float
    alert: bool
    direction: str  # "ok", "too many rejections", "too few rejections"
    total_seen: int
    total_rejected: int
    alerts: int  # how many updates ended in an alert so far

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RejectionMonitor:
    """Rolling rejection rate of a guard with a binomial test against its calibration.

    Parameters
    ----------
    expected_rate : the rejection probability of an in-distribution input (a guard's
        ``expected_reject_rate_``).
    window : number of most recent decisions kept.
    alert_level : significance of the two-sided binomial test.
    min_samples : no alert before this many decisions are in the window.
    on_alert : optional callable receiving the `MonitorStatus` when an update alerts.
    """

    def __init__(self, expected_rate: float, window: int = 1000, alert_level: float = 1e-3,
                 min_samples: int = 100, on_alert: Callable[[MonitorStatus], Any] | None = None):
        if not 0.0 < float(expected_rate) < 1.0:
            raise ValueError(f"expected_rate must be in (0, 1), got {expected_rate}.")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window}.")
        if not 0.0 < alert_level < 1.0:
            raise ValueError(f"alert_level must be in (0, 1), got {alert_level}.")
        if int(min_samples) != min_samples or not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be an integer in [1, window], got {min_samples}.")
        self.expected_rate = float(expected_rate)
        self.window = int(window)
        self.alert_level = float(alert_level)
        self.min_samples = int(min_samples)
        self.on_alert = on_alert
        self._ring = np.zeros(self.window, dtype=bool)  # True = rejected
        self._pos = 0
        self._filled = 0
        self._total = 0
        self._total_rejected = 0
        self._alerts = 0
        self._lock = threading.Lock()

    def update(self, accepted) -> MonitorStatus:
        """Record a batch of decisions (True = accepted) and return the new status."""
        rejected = ~np.asarray(accepted, dtype=bool).reshape(-1)
        with self._lock:
            tail = rejected[-self.window:]
            n = len(tail)
            idx = (self._pos + np.arange(n)) % self.window
            self._ring[idx] = tail
            self._pos = (self._pos + n) % self.window
            self._filled = min(self.window, self._filled + n)
            self._total += len(rejected)
            self._total_rejected += int(rejected.sum())
            status = self._status()
            if status.alert:
                self._alerts += 1
                status = MonitorStatus(**{**status.__dict__, "alerts": self._alerts})
        if status.alert and self.on_alert is not None:
            self.on_alert(status)
        return status

    def status(self) -> MonitorStatus:
        with self._lock:
            return self._status()

    def reset(self) -> None:
        with self._lock:
            self._ring[:] = False
            self._pos = self._filled = self._total = self._total_rejected = self._alerts = 0

    def _status(self) -> MonitorStatus:
        from scipy.stats import binom, binomtest

        n = self._filled
        k = int(self._ring[:n].sum()) if n == self.window else int(
            self._ring[(self._pos - n + np.arange(n)) % self.window].sum())
        p0 = self.expected_rate
        if n == 0:
            return MonitorStatus(0, 0, float("nan"), p0, 0.0, 1.0, 1.0, False, "ok",
                                 self._total, self._total_rejected, self._alerts)
        p_value = float(binomtest(k, n, p0).pvalue)
        low = float(binom.ppf(self.alert_level / 2, n, p0)) / n
        high = float(binom.isf(self.alert_level / 2, n, p0)) / n
        alert = n >= self.min_samples and p_value < self.alert_level
        direction = "ok" if not alert else (
            "too many rejections" if k / n > p0 else "too few rejections")
        return MonitorStatus(n, k, k / n, p0, low, high, p_value, alert, direction,
                             self._total, self._total_rejected, self._alerts)
