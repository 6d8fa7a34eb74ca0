"""Detector protocol and registry.

A detector is a small scikit-learn-style estimator:

* constructor arguments are its hyperparameters, stored as given (no work in ``__init__``);
* ``fit(train)`` learns from in-distribution `Features` and returns ``self``;
* ``score(x)`` returns one float per sample, **higher = more in-distribution**;
* ``requires`` names the fields ``score`` reads, ``fit_requires`` those ``fit`` reads;
* ``search_space`` maps hyperparameter names to candidate values for tuning.

Subclasses implement ``_fit`` and ``_score``; the public methods here validate inputs so
every detector rejects bad input with the same clear messages.

Two small protocols are declared here so callers never probe detectors with ``getattr``:

* tuning — ``score_params`` (hyperparameters that do not change what ``fit`` learns, so
  candidates differing only in them share one fit), ``plan_score_params`` (told every such
  value before scoring, so work can be shared), ``stateful`` with ``reset`` and
  ``score_mixed`` (detectors with a test-time memory, scored as one seeded stream);
* persistence — ``get_state`` / ``set_state`` return and restore the fitted state (the
  attributes ending in ``_``, minus the caches named in ``transient_state``);
  `oodscope.persistence` writes that state as arrays + JSON, never pickle.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from ..features import Features, as_features

__all__ = [
    "Detector",
    "NotFittedError",
    "register",
    "create",
    "list_detectors",
    "get_detector_class",
    "detector_info",
]


class NotFittedError(ValueError, AttributeError):
    """Raised when ``score`` is called before ``fit``."""


_REGISTRY: dict[str, type["Detector"]] = {}


def register(name: str | None = None, *aliases: str) -> Callable[[type["Detector"]], type["Detector"]]:
    """Class decorator adding a detector to the registry under ``name`` (and aliases)."""

    def deco(cls: type[Detector]) -> type[Detector]:
        key = (name or cls.name or cls.__name__).lower()
        cls.name = key
        for k in (key, *aliases):
            k = k.lower()
            if k in _REGISTRY and _REGISTRY[k] is not cls:
                raise ValueError(f"Detector name {k!r} is already registered by {_REGISTRY[k].__name__}.")
            _REGISTRY[k] = cls
        cls._aliases = tuple(a.lower() for a in aliases)
        return cls

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers the built-in families; lazy so `import oodscope` is light.
    from . import _load_builtin  # noqa: F401

    _load_builtin()


def get_detector_class(name: str) -> type["Detector"]:
    _ensure_loaded()
    key = name.lower()
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown detector {name!r}.{hint} See oodscope.list_detectors() for all names."
        )
    return _REGISTRY[key]


def create(name: str, **params: Any) -> "Detector":
    """Build a registered detector by name: ``create("knn", k=50)``."""
    cls = get_detector_class(name)
    valid = cls._param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"Detector {cls.name!r} has no hyperparameter(s) {unknown}; valid ones: {valid}."
        )
    return cls(**params)


def list_detectors(requires: Iterable[str] | None = None) -> list[str]:
    """Sorted names of registered detectors (canonical names, not aliases).

    With ``requires``, keep only detectors whose needs are a subset of those fields.
    """
    _ensure_loaded()
    names = sorted({cls.name for cls in _REGISTRY.values()})
    if requires is not None:
        have = set(requires)
        names = [n for n in names if _REGISTRY[n].all_requirements() <= have]
    return names


def detector_info() -> "Any":
    """A `pandas.DataFrame` describing every detector: family, needs, defaults, reference."""
    import pandas as pd

    rows = []
    for name in list_detectors():
        cls = _REGISTRY[name]
        rows.append(
            {
                "name": name,
                "family": cls.__module__.rsplit(".", 1)[-1],
                "requires": ",".join(sorted(cls.requires)),
                "fit_requires": ",".join(sorted(cls.fit_requirements())),
                "defaults": ", ".join(f"{k}={v!r}" for k, v in cls._defaults().items()),
                "search_space": ", ".join(f"{k}={v}" for k, v in cls.search_space.items()),
                "scoring": f"stateful: {cls.stream_note}" if cls.stateful else "per sample",
                "reference": cls.reference,
            }
        )
    return pd.DataFrame(rows)


class Detector:
    """Base class of every OOD detector. Higher score = more in-distribution."""

    name: ClassVar[str] = ""
    #: Fields ``score`` reads (see `oodscope.features.FIELDS`; other names are extras).
    requires: ClassVar[frozenset[str]] = frozenset({"logits"})
    #: Fields ``fit`` reads; ``None`` means nothing to fit (``fit()`` may be called without data).
    fit_fields: ClassVar[frozenset[str] | None] = None
    #: Candidate values per hyperparameter, for validation tuning.
    search_space: ClassVar[dict[str, list[Any]]] = {}
    #: Paper reference shown by ``oodscope list``.
    reference: ClassVar[str] = ""
    #: Minimum number of training samples ``fit`` accepts.
    min_fit_samples: ClassVar[int] = 2
    #: Hyperparameters that only change scoring, not what ``fit`` learns: tuning candidates
    #: differing only in these share one fitted state (a shallow copy with the values set).
    score_params: ClassVar[frozenset[str]] = frozenset()
    #: Whether scores depend on what was scored before (a test-time memory, e.g. AdaNeg):
    #: such detectors are reset and scored as one seeded ID/OOD stream (`score_mixed`).
    stateful: ClassVar[bool] = False
    #: For a ``stateful`` detector: how the scores of a batch relate to scoring its rows
    #: (shown by ``oodscope list``). Stateless detectors score every sample on its own.
    stream_note: ClassVar[str] = ""
    #: Why a benchmark leaves this detector out unless it is named (or ``"all"``): set on
    #: detectors whose ``fit`` trains a network for minutes (MOL, DisCoPatch); empty = runs
    #: by default wherever its inputs are available.
    not_by_default: ClassVar[str] = ""
    #: Fitted attributes that are caches, rebuilt on demand: `get_state` leaves them out.
    transient_state: ClassVar[frozenset[str]] = frozenset()
    _aliases: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        }

    @classmethod
    def fit_requirements(cls) -> frozenset[str]:
        return frozenset() if cls.fit_fields is None else frozenset(cls.fit_fields)

    @classmethod
    def all_requirements(cls) -> frozenset[str]:
        return frozenset(cls.requires) | cls.fit_requirements()

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> "Detector":
        valid = self._param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__} has no hyperparameter {k!r}; valid: {valid}.")
            setattr(self, k, v)
        self._reset_fit()
        return self

    def clone(self, **params: Any) -> "Detector":
        """An unfitted copy with the same (optionally overridden) hyperparameters."""
        kw = {k: copy.deepcopy(v) if isinstance(v, (list, dict)) else v for k, v in self.get_params().items()}
        kw.update(params)
        return type(self)(**kw)

    def _reset_fit(self) -> None:
        for k in list(vars(self)):
            if k.endswith("_") and not k.startswith("__"):
                delattr(self, k)

    def __repr__(self) -> str:
        defaults = self._defaults()
        shown = [
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if k not in defaults or _differs(v, defaults[k])
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # ------------------------------------------------------------ public API
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "fitted_", False)

    def fit(self, train: Features | None = None, **kwargs: Any) -> "Detector":
        """Learn from in-distribution data. Returns ``self``."""
        self._reset_fit()
        self._check_params()
        need = self.fit_requirements()
        if train is None:
            if need - {"model"}:
                raise ValueError(
                    f"{type(self).__name__}.fit needs in-distribution Features with "
                    f"{sorted(need)}; got None."
                )
        else:
            train = as_features(train)
            train.require(need, f"{type(self).__name__}.fit")
            self._check_finite(train, need, "fit")
            if need and len(train) < self.min_fit_samples:
                raise ValueError(
                    f"{type(self).__name__}.fit needs at least {self.min_fit_samples} "
                    f"in-distribution samples, got {len(train)}."
                )
            if "labels" in need:
                self._check_labels(train)
        self._fit(train, **kwargs)
        self.fitted_ = True
        self._fit_dims_ = self._dims(train) if train is not None else {}
        return self

    def score(self, x: Features) -> np.ndarray:
        """One float per sample, higher = more in-distribution."""
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet: call .fit(train_features) first "
                "(or .fit() for detectors that learn nothing)."
            )
        x = as_features(x)
        x.require(self.requires, f"{type(self).__name__}.score")
        if len(x) == 0:
            raise ValueError(f"{type(self).__name__}.score got 0 samples.")
        self._check_finite(x, self.requires, "score")
        for key, dim in self._dims(x).items():
            seen = self._fit_dims_.get(key)
            if seen is not None and seen != dim:
                raise ValueError(
                    f"{type(self).__name__} was fitted on {key} of width {seen} but got width "
                    f"{dim}; score with Features from the same model/layer."
                )
        scores = np.asarray(self._score(x), dtype=np.float64).reshape(-1)
        if scores.shape[0] != len(x):
            raise RuntimeError(
                f"{type(self).__name__} returned {scores.shape[0]} scores for {len(x)} samples."
            )
        if not np.all(np.isfinite(scores)):
            bad = int(np.sum(~np.isfinite(scores)))
            raise FloatingPointError(
                f"{type(self).__name__} produced {bad} non-finite scores; this is a bug or an "
                "extreme input (check the feature scale)."
            )
        return scores

    def fit_score(self, train: Features, x: Features) -> np.ndarray:
        return self.fit(train).score(x)

    # ------------------------------------------------------------ tuning protocol
    def plan_score_params(self, values: dict[str, list[Any]]) -> None:
        """Called by the tuner right after a fit with every value of each ``score_params``
        entry that will be scored on this fitted state, so a detector can compute them in
        one pass. Default: nothing to plan."""

    def equivalent_fit_params(self, params: dict[str, Any], n_train: int | None) -> dict[str, Any]:
        """``params`` (a tuning candidate) with fit-time values that learn the same state on
        ``n_train`` training samples written the same way, so the tuner fits once for all of
        them (e.g. CF-OOD's reference fractions that all reach ``max_reference`` rows).
        Default: unchanged."""
        return params

    def fit_summary(self) -> dict[str, Any]:
        """What the fit chose beyond the hyperparameters, for reports (e.g. the search index
        of a neighbour detector and its measured recall@k). Default: nothing."""
        return {}

    def reset(self) -> "Detector":
        """Forget test-time state (the memory of a ``stateful`` detector). Default: no-op."""
        return self

    def score_mixed(self, id_set: Features, ood_set: Features, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(id_scores, ood_scores)`` of an ID and an OOD set.

        A stateless detector scores each set on its own. A ``stateful`` one is reset and
        scores both as one seeded, interleaved stream, so its memory cannot learn which
        stream it is in; scores come back in the input order of each set."""
        if not self.stateful:
            return self.score(id_set), self.score(ood_set)
        both = Features.concat([as_features(id_set), as_features(ood_set)])
        perm = np.random.default_rng(seed).permutation(len(both))
        self.reset()
        scores = np.empty(len(both))
        scores[perm] = self.score(both[perm])
        n = len(id_set)
        return scores[:n], scores[n:]

    # ------------------------------------------------------------ persistence protocol
    def get_state(self) -> dict[str, Any]:
        """The fitted state: every attribute ending in ``_`` except ``transient_state``.

        Values are arrays, JSON-able scalars and containers, nested detectors, or objects
        `oodscope.persistence` knows how to write; override together with `set_state`
        when a detector holds anything else (e.g. a torch model)."""
        return {
            k: v for k, v in vars(self).items()
            if k.endswith("_") and not k.startswith("__") and k not in self.transient_state
        }

    def set_state(self, state: dict[str, Any]) -> "Detector":
        """Restore what `get_state` returned (on an instance with the same parameters)."""
        self._reset_fit()
        for k, v in state.items():
            if not (isinstance(k, str) and k.endswith("_")):
                raise ValueError(f"{type(self).__name__}: state key {k!r} is not a fitted attribute.")
            setattr(self, k, v)
        return self

    # ------------------------------------------------------------ hooks
    def _fit(self, train: Features | None) -> None:
        """Learn state (attributes ending in ``_``). Default: nothing to learn."""

    def _score(self, x: Features) -> np.ndarray:
        raise NotImplementedError

    def _check_params(self) -> None:
        """Validate hyperparameters; raise ``ValueError`` with a helpful message."""

    # ------------------------------------------------------------ validation helpers
    @staticmethod
    def _dims(f: Features) -> dict[str, int]:
        dims = {}
        if f.logits is not None:
            dims["logits"] = int(f.logits.shape[1])
        if f.features is not None:
            dims["features"] = int(f.features.shape[1])
        for k, v in f.extras.items():
            if v.ndim >= 2:
                dims[k] = tuple(v.shape[1:]) if v.ndim > 2 else int(v.shape[1])
        return dims

    def _check_finite(self, f: Features, fields: Iterable[str], stage: str) -> None:
        for name in fields:
            if name in ("labels", "model"):
                continue
            if name == "head":
                arrays = [("head_weight", f.head_weight), ("head_bias", f.head_bias)]
            elif name in ("logits", "features"):
                arrays = [(name, getattr(f, name))]
            else:
                arrays = [(name, f.extras.get(name))]
            for label, arr in arrays:
                if arr is None or arr.dtype.kind not in "fc":
                    continue
                if arr.size and not _all_finite(arr):
                    raise ValueError(
                        f"{type(self).__name__}.{stage}: `{label}` contains NaN or inf. "
                        "Remove or repair those samples (e.g. np.nan_to_num) before scoring."
                    )

    def _check_labels(self, f: Features) -> None:
        labels = f.labels
        if labels.size and labels.min() < 0:
            raise ValueError(
                f"{type(self).__name__}.fit needs labels of in-distribution samples; "
                f"found negative label {labels.min()} (unknown/OOD)."
            )
        c = f.num_classes
        if c is not None and labels.size and labels.max() >= c:
            raise ValueError(
                f"{type(self).__name__}.fit: label {labels.max()} is out of range for {c} classes."
            )


def _all_finite(arr: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Whether every value is finite, checked ``chunk`` values at a time (rows at a time
    for a 2-D or wider array, whose pages are released afterwards if it is memory-mapped,
    so checking an ImageNet-size bank on disk does not leave it resident)."""
    from ._neighbors import release_rows

    if arr.ndim < 2:
        flat = arr.reshape(-1)
        return all(np.isfinite(flat[s : s + chunk]).all() for s in range(0, flat.size, chunk))
    step = max(1, chunk // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, len(arr), step):
        sl = slice(start, min(start + step, len(arr)))
        ok = bool(np.isfinite(arr[sl]).all())
        release_rows(arr, sl)
        if not ok:
            return False
    return True


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:
        return a is not b
