"""Score fusion: combine any detectors into one score.

Each member's scores live on their own scale (energies, distances, probabilities), so they
are first mapped to a common one with statistics learned on held-out in-distribution data:

* ``"zscore"``: ``(s − mean) / std`` of the member's held-out ID scores;
* ``"rank"``: the empirical CDF of the member's held-out ID scores, i.e. the fraction of
  ID samples scoring below ``s`` (a per-sample p-value; it saturates at 0 and 1 outside
  the range seen in calibration).

Both are per-sample maps, so a sample's fused score never depends on the rest of the batch.
The calibration statistics come from a held-out part of the training Features, because a
member scored on its own training data is optimistic (a KNN sample is its own neighbour).

``method`` and ``weights`` only act at score time: ``fit`` keeps the sorted calibration
scores (enough for both maps) and the members' raw scores of the last few query sets are
cached (keyed by the query arrays' bytes), so tuning ``method`` fits and scores the members
once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._numeric import array_key
from .._params import store_params
from ..features import Features
from .base import Detector, create, register

__all__ = ["Ensemble"]

_DEFAULT_MEMBERS = ("energy", "knn", "mahalanobis")


class _PerInstance:
    """Class access gives the broad default (registry table); instance access is computed."""

    def __init__(self, default: Any, compute):
        self.default = default
        self.compute = compute

    def __get__(self, obj, cls=None):
        return self.default if obj is None else self.compute(obj)


def _member_label(spec: Any) -> str:
    if isinstance(spec, Detector):
        return type(spec).name or type(spec).__name__
    if isinstance(spec, (tuple, list)):
        return str(spec[0])
    return str(spec)


def _build_member(spec: Any, who: str = "Ensemble member") -> Detector:
    """A fresh detector from a name, a ``(name, params)`` pair or a Detector (cloned)."""
    if isinstance(spec, Detector):
        return spec.clone()
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return create(spec[0], **spec[1])
    raise ValueError(
        f"{who} {spec!r} is not understood: give a detector name, a (name, params) "
        "pair such as ('knn', {'k': 50}), or a Detector instance."
    )


def _members_requires(self: "Ensemble") -> frozenset[str]:
    out: set[str] = set()
    for m in self._resolved_members():
        out |= set(m.requires)
    return frozenset(out)


def _members_fit_requirements(self: "Ensemble"):
    def fit_requirements() -> frozenset[str]:
        out: set[str] = set()
        for m in self._resolved_members():
            # calibration scores the members on held-out training data, so fit needs what
            # score needs as well as what the members' own fit needs
            out |= set(m.fit_requirements()) | set(m.requires)
        return frozenset(out)

    return fit_requirements


def _class_fit_requirements(default: frozenset[str]):
    return lambda: default


class _FitRequirements(_PerInstance):
    def __get__(self, obj, cls=None):
        return _class_fit_requirements(self.default) if obj is None else self.compute(obj)


def _all_requirements(self: "Ensemble"):
    return lambda: frozenset(self.requires) | self.fit_requirements()


class _AllRequirements(_PerInstance):
    def __get__(self, obj, cls=None):
        if obj is None:
            return lambda: frozenset(cls.requires) | cls.fit_requirements()
        return self.compute(obj)


@register("ensemble")
class Ensemble(Detector):
    """Average of members' scores after per-member normalisation fitted on held-out ID data.

    Parameters
    ----------
    members : detector names, ``(name, params)`` pairs or `Detector` instances (cloned).
        Default ``["energy", "knn", "mahalanobis"]``.
    method : ``"zscore"`` or ``"rank"`` (empirical CDF of held-out ID scores).
    weights : optional non-negative weight per member (normalised to sum to one).
    calibration_fraction : share of the training Features held out to fit the
        normalisation; members are fitted on the rest. With fewer than 10 training samples
        everything is used for both (the statistics are then optimistic).
    random_state : seed of the held-out split.
    """

    # Broad defaults for the registry table (the default members); instances compute theirs.
    requires = _PerInstance(frozenset({"logits", "features"}), _members_requires)
    fit_fields = frozenset({"logits", "features", "labels"})
    fit_requirements = _FitRequirements(frozenset({"logits", "features", "labels"}), _members_fit_requirements)
    all_requirements = _AllRequirements(None, _all_requirements)
    search_space = {"method": ["zscore", "rank"]}
    score_params = frozenset({"method", "weights"})  # neither changes what fit learns
    transient_state = frozenset({"_raw_cache_"})
    reference = (
        "Score fusion of OOD detectors (z-score / rank averaging); see e.g. Haroush et al., "
        "A Statistical Framework for Efficient Out of Distribution Detection in Deep Neural "
        "Networks, ICLR 2022"
    )

    def __init__(
        self,
        members: Sequence[Any] = _DEFAULT_MEMBERS,
        method: str = "zscore",
        weights: Sequence[float] | None = None,
        calibration_fraction: float = 0.2,
        random_state: int = 0,
    ):
        store_params(self, locals())

    # ------------------------------------------------------------ members
    def _resolved_members(self) -> list[Detector]:
        """Fitted members when fitted, otherwise fresh (unfitted) ones built from the spec."""
        fitted = getattr(self, "members_", None)
        if fitted is not None:
            return fitted
        return [_build_member(spec) for spec in self._member_specs()]

    def _member_specs(self) -> list[Any]:
        members = self.members
        if isinstance(members, (str, Detector)):
            members = [members]
        return list(members)

    def _check_params(self) -> None:
        specs = self._member_specs()
        if not specs:
            raise ValueError("Ensemble needs at least one member detector.")
        for spec in specs:
            _build_member(spec)  # raises a clear error for unknown names or bad params
        if self.method not in ("zscore", "rank"):
            raise ValueError(f"method must be 'zscore' or 'rank', got {self.method!r}.")
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != (len(specs),):
                raise ValueError(
                    f"weights must have one entry per member ({len(specs)}), got {len(w)}."
                )
            if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
                raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}.")
        if not 0.0 < float(self.calibration_fraction) < 1.0:
            raise ValueError(
                f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}."
            )

    def fit(self, train: Features | None = None, **kwargs: Any) -> "Ensemble":
        # Name the member that cannot run before the generic (union) check does.
        self._reset_fit()
        self._check_params()
        if train is not None and isinstance(train, Features):
            for spec, m in zip(self._member_specs(), self._resolved_members()):
                need = set(m.fit_requirements()) | set(m.requires)
                missing = sorted(n for n in need if n != "model" and not train.has(n))
                if missing:
                    raise ValueError(
                        f"Ensemble member {_member_label(spec)!r} needs {missing}, which these "
                        "Features do not have; drop that member or extract those fields."
                    )
        return super().fit(train, **kwargs)

    # ------------------------------------------------------------ fit / score
    _CACHE_ENTRIES = 4

    def _fit(self, train: Features | None) -> None:
        members = [_build_member(spec) for spec in self._member_specs()]
        if train is None:  # only members that learn nothing (fit_requirements empty)
            fit_part = calib = None
        else:
            n = len(train)
            n_cal = int(round(n * float(self.calibration_fraction)))
            if n < 10 or n_cal < 1 or n - n_cal < 2:
                fit_part = calib = train
            else:
                perm = np.random.default_rng(self.random_state).permutation(n)
                calib, fit_part = train[np.sort(perm[:n_cal])], train[np.sort(perm[n_cal:])]
        if calib is None:
            raise ValueError(
                "Ensemble.fit needs in-distribution Features to calibrate the members' scores."
            )
        sorted_scores, zstats = [], []
        for m in members:
            m.fit(fit_part if m.fit_requirements() else None)
            s = np.sort(m.score(calib))
            sorted_scores.append(s)
            std = float(np.std(s))
            scale = max(abs(float(np.mean(s))), 1.0)
            # constant calibration scores: keep the member but only as a shift
            zstats.append((float(np.mean(s)), std if std > 1e-12 * scale else 1.0))
        self.members_ = members
        self.calibration_sorted_ = sorted_scores
        self.calibration_zscore_ = zstats
        # Shared by shallow copies (the tuner's score-time candidates); emptied by a refit.
        self._raw_cache_: dict[Any, np.ndarray] = {}

    @property
    def calibration_(self) -> list[Any]:
        """Per member: ``(mean, std)`` for ``"zscore"``, the sorted scores for ``"rank"``."""
        return self.calibration_zscore_ if self.method == "zscore" else self.calibration_sorted_

    @property
    def weights_(self) -> np.ndarray:
        """Member weights normalised to sum to one."""
        n = len(self.members_)
        w = np.ones(n) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (n,) or not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {self.weights!r}.")
        return w / w.sum()

    def _query_key(self, x: Features) -> Any:
        parts: list[Any] = [len(x)]
        for name in sorted(set(self.requires) - {"model", "labels"}):
            if name == "head":
                arrays = [x.head_weight, x.head_bias]
            elif name in ("features", "logits"):
                arrays = [getattr(x, name)]
            else:
                arrays = [x.extras.get(name)]
            for a in arrays:
                if a is None:
                    parts.append(None)
                    continue
                parts.append((name, array_key(a)))
        return tuple(parts)

    def raw_member_scores(self, x: Features) -> np.ndarray:
        """``(N, M)`` raw score of every member (cached for the last few query sets)."""
        cache = self.__dict__.get("_raw_cache_")
        key = self._query_key(x) if cache is not None else None
        if cache is not None and key in cache:
            return cache[key]
        raw = np.stack([np.asarray(m.score(x), dtype=np.float64) for m in self.members_], axis=1)
        if cache is not None:
            cache[key] = raw
            while len(cache) > self._CACHE_ENTRIES:
                cache.pop(next(iter(cache)))
        return raw

    def member_scores(self, x: Features) -> np.ndarray:
        """``(N, M)`` normalised score of every member (before weighting)."""
        if self.method not in ("zscore", "rank"):
            raise ValueError(f"method must be 'zscore' or 'rank', got {self.method!r}.")
        raw = self.raw_member_scores(x)
        cols = []
        for j in range(raw.shape[1]):
            s = raw[:, j]
            if self.method == "zscore":
                mean, std = self.calibration_zscore_[j]
                cols.append((s - mean) / std)
            else:
                stat = self.calibration_sorted_[j]
                below = np.searchsorted(stat, s, side="left")
                at_or_below = np.searchsorted(stat, s, side="right")
                cols.append((below + at_or_below) / (2.0 * len(stat)))  # mid-rank for ties
        return np.stack(cols, axis=1)

    def _score(self, x: Features) -> np.ndarray:
        return self.member_scores(x) @ self.weights_
