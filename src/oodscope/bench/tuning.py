"""Hyperparameter selection on validation data only (ID-val vs a validation OOD set).

Every candidate of a detector's ``search_space`` (the full grid) is fitted on the ID
training Features and scored on the cached validation Features; the best candidate has the
highest AUROC, ties broken by the lowest FPR@95. Test OOD sets are never seen here: the
function only receives the training and validation splits.

Fitting is shared between candidates whenever the detector says a hyperparameter does not
change what ``fit`` learns (class attribute ``score_params``, a set of names): candidates
that differ only in those reuse one fitted state (a shallow copy with the score-time values
set, so caches the fitted detector keeps are shared). A detector with a
``plan_score_params(values)`` method is told, right after such a fit, every score-time value
that will reuse it (Relation then sums its relation matrix for all ``pow`` values in one
pass); results are the same as scoring each candidate from a fresh fit. Candidates whose
fit-time values learn the same state on this training set (the detector's
``equivalent_fit_params``, e.g. CF-OOD reference fractions capped at the same number of
rows) share one fit too.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..detectors.base import Detector
from ..features import Features
from ..metrics import auroc, fpr_at_95_tpr

__all__ = ["TuningResult", "candidate_grid", "public_params", "score_pair", "tune"]


@dataclass
class TuningResult:
    """Outcome of a grid search: the chosen parameters and every candidate's scores."""

    best_params: dict[str, Any]
    detector: Detector  # fitted with ``best_params`` on the training split
    candidates: list[dict[str, Any]] = field(default_factory=list)  # params + val metrics
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    n_fits: int = 0


def candidate_grid(search_space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a search space, in declaration order; ``[{}]`` when empty."""
    if not search_space:
        return [{}]
    names = list(search_space)
    for n in names:
        if not isinstance(search_space[n], (list, tuple)) or len(search_space[n]) == 0:
            raise ValueError(
                f"search_space[{n!r}] must be a non-empty list of candidates, got {search_space[n]!r}."
            )
    return [dict(zip(names, combo)) for combo in itertools.product(*(search_space[n] for n in names))]


def _is_better(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """AUROC first (higher), FPR@95 second (lower), then the detector's default values, then
    the earlier candidate."""
    if b is None:
        return True
    if a["val_auroc"] != b["val_auroc"]:
        return a["val_auroc"] > b["val_auroc"]
    if a["val_fpr_at_95_tpr"] != b["val_fpr_at_95_tpr"]:
        return a["val_fpr_at_95_tpr"] < b["val_fpr_at_95_tpr"]
    return a.get("is_default", False) and not b.get("is_default", False)


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _stable_desc(grid: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Sort candidates by ``name`` descending (None and unorderable values last)."""
    def key(p: dict[str, Any]) -> tuple[int, Any]:
        v = p.get(name)
        return (0, -v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0)

    return sorted(grid, key=key)


def _fit_key(params: dict[str, Any], score_only: set[str]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items() if k not in score_only))


def tune(
    detector: Detector,
    train: Features,
    val_id: Features,
    val_ood: Features,
    search_space: dict[str, list[Any]] | None = None,
    seed: int = 0,
) -> TuningResult:
    """Choose ``detector``'s hyperparameters on (val_id, val_ood) from a grid.

    Parameters
    ----------
    detector : an unfitted (or fitted) detector; its current parameters are the base that
        each candidate overrides.
    train : ID training Features (fit).
    val_id, val_ood : validation splits; the only data that decides the choice.
    search_space : overrides ``type(detector).search_space``.
    seed : for stateful (order-dependent) detectors, the seed of the ID/OOD interleaving.

    Stateful detectors (class attribute ``stateful = True``, e.g. AdaNeg) get ``reset()``
    before each candidate and score ID-val and val-OOD as one seeded mixed stream
    (``score_mixed``), as the runner does on the test sets.

    Returns a `TuningResult` whose ``detector`` is fitted with the chosen parameters.
    """
    space = type(detector).search_space if search_space is None else search_space
    grid = candidate_grid(dict(space))
    unknown = sorted({k for c in grid for k in c} - set(detector._param_names()))
    if unknown:
        raise ValueError(
            f"search_space of {type(detector).__name__} names {unknown}, which are not "
            f"constructor parameters ({detector._param_names()})."
        )
    score_only = set(type(detector).score_params)
    needs_fit = type(detector).fit_fields is not None
    if score_only:
        # Candidates sharing a fit run together, largest score-time values first, so
        # detectors that cache work (e.g. a k-NN search at the largest k) reuse it.
        for name in sorted(score_only, reverse=True):
            grid = _stable_desc(grid, name)
        grid = sorted(grid, key=lambda p: _fit_key(p, score_only))

    n_train = None if train is None else len(train)
    fit_keys = [_fit_key(detector.equivalent_fit_params(dict(p), n_train), score_only) for p in grid]
    fitted: dict[str, Detector] = {}
    rows: list[dict[str, Any]] = []
    best_row: dict[str, Any] | None = None
    best_det: Detector | None = None
    fit_s = score_s = 0.0
    n_fits = 0
    defaults = type(detector)._defaults()
    first_error: Exception | None = None
    for params, key in zip(grid, fit_keys):
        t0 = time.perf_counter()
        try:
            if key in fitted:
                # Same fitted state, different score-time parameters: copy, do not refit.
                det = copy.copy(fitted[key])
                for k, v in params.items():
                    setattr(det, k, v)
            else:
                det = detector.clone(**params)
                det.fit(train if needs_fit else None)
                fitted[key] = det
                n_fits += 1
                if score_only:
                    # every score-time value that will reuse this fit, so the detector can
                    # compute them together on the first scoring
                    det.plan_score_params({
                        n: [c[n] for c, ck in zip(grid, fit_keys) if n in c and ck == key]
                        for n in score_only})
            t1 = time.perf_counter()
            s_id, s_ood = score_pair(det, val_id, val_ood, seed)
        except Exception as exc:  # one impossible candidate (e.g. k > n) must not sink the rest
            fit_s += time.perf_counter() - t0
            first_error = first_error or exc
            rows.append({"params": dict(params), "val_auroc": None, "val_fpr_at_95_tpr": None,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        t2 = time.perf_counter()
        fit_s += t1 - t0
        score_s += t2 - t1
        row = {
            "params": dict(params),
            "val_auroc": float(auroc(s_id, s_ood)),
            "val_fpr_at_95_tpr": float(fpr_at_95_tpr(s_id, s_ood)),
            "is_default": all(_same(v, defaults.get(k, _MISSING)) for k, v in params.items()),
        }
        rows.append(row)
        if _is_better(row, best_row):
            best_row, best_det = row, det
    if best_det is None:
        assert first_error is not None
        raise first_error
    assert best_det is not None and best_row is not None
    if score_only:
        # tuning is over: the test sets are scored with the chosen values only
        best_det.plan_score_params({n: [] for n in score_only})
    for r in rows:
        r["chosen"] = r is best_row
        r.pop("is_default", None)
    best_params = {**detector.get_params(), **best_row["params"]}
    return TuningResult(
        best_params=public_params(best_params),
        detector=best_det,
        candidates=rows,
        fit_seconds=fit_s,
        score_seconds=score_s,
        n_fits=n_fits,
    )


def score_pair(det: Detector, id_set: Features, ood_set: Features, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(id_scores, ood_scores)``. A stateful detector starts from an empty memory and sees
    ID and OOD as one seeded, interleaved stream (``score_mixed``); others score each set."""
    det.reset()
    s_id, s_ood = det.score_mixed(id_set, ood_set, seed=seed)
    return np.asarray(s_id, dtype=np.float64), np.asarray(s_ood, dtype=np.float64)


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters worth showing (drop large objects such as a model or an encoder)."""
    out = {}
    for k, v in params.items():
        if v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating)):
            out[k] = v.item() if isinstance(v, (np.integer, np.floating)) else v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v) and len(v) <= 16:
            out[k] = list(v)
    return out
