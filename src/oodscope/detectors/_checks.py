"""Validation shared by the detector families: hyperparameter checks with one wording, and
the guard against scores that silently stopped depending on the input."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["check_fraction", "check_int", "check_less", "check_percentile", "check_positive_int",
           "check_real", "refuse_unresolved_scores"]


def check_int(owner: object, name: str, value: Any, low: int = 1) -> None:
    """``value`` must be an integer (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{type(owner).__name__}: {name} must be an integer >= {low}, got {value!r}.")


def check_real(owner: object, name: str, value: Any, low: float = 0.0, strict: bool = False) -> None:
    """``value`` must be a finite real number ``>= low`` (``> low`` with ``strict``)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and np.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{type(owner).__name__}: {name} must be a finite number {bound}, got {value!r}.")


def check_fraction(owner: object, name: str, value: Any, allow_one: bool = True) -> None:
    """``value`` must be a number in ``(0, 1]`` (``(0, 1)`` without ``allow_one``)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and 0.0 < value
          and (value <= 1.0 if allow_one else value < 1.0))
    if not ok:
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{type(owner).__name__}: {name} must be a fraction in {bound}, got {value!r}.")

def check_positive_int(name: str, value: Any) -> None:
    """``value`` must be an integer (not a bool) ``>= 1``; the message names the parameter only."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_percentile(owner: object, name: str, value: Any, *, upper_open: bool = False) -> None:
    """``value`` must be a percentile: a finite number in ``[0, 100]`` (``[0, 100)`` with
    ``upper_open``)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and np.isfinite(value)
        and 0 <= value <= 100
        and not (upper_open and value == 100)
    )
    if not ok:
        bound = "[0, 100)" if upper_open else "[0, 100]"
        raise ValueError(
            f"{type(owner).__name__}: {name} is a percentile and must be a number in {bound}, "
            f"got {value!r}."
        )


def check_less(owner: object, low: str, high: str) -> None:
    """The hyperparameter named ``low`` must be smaller than the one named ``high``."""
    a, b = getattr(owner, low), getattr(owner, high)
    if not a < b:
        raise ValueError(f"{type(owner).__name__}: need {low} < {high}, got {low}={a}, {high}={b}.")

#: Inputs whose largest magnitude lies outside this range are "extreme units": float32
#: networks and softmaxes saturate or underflow there.
_ORDINARY_MAGNITUDE = (1e-15, 1e15)


def refuse_unresolved_scores(who: str, scores: np.ndarray, inputs: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` when differing inputs of extreme magnitude all got one score.

    A detector that is not scale-invariant (e.g. it runs the network on the inputs) can
    saturate on inputs in extreme units: every sample then gets the same score and a
    benchmark would report chance level as if it were a result. Equal scores for equal
    inputs, or at ordinary magnitudes (a confident batch whose softmax saturates), are
    left alone.
    """
    if len(scores) < 2 or np.ptp(scores) > 0:
        return
    rows = np.asarray(inputs).reshape(len(inputs), -1)
    if not np.any(rows != rows[:1]):
        return
    peak = float(np.max(np.abs(rows)))
    lo, hi = _ORDINARY_MAGNITUDE
    if lo <= peak <= hi:
        return
    raise ValueError(
        f"{who} gave all {len(scores)} samples the same score although they differ: `{name}` "
        f"reach magnitude {peak:.1e}, where the computation saturates in floating point. "
        "Give the inputs in the units the model was trained on (e.g. normalised pixels)."
    )
