"""What a benchmark is, as data: `BenchmarkSpec`, the shared `ProviderOptions`, and the
`FeatureSet` a spec's builder returns.

A spec names the in-distribution set, the test OOD sets by group (near, far, covariate),
how the validation OOD set is made (the only OOD data tuning may see), the default
detectors and the subset size of ``--quick``. Its ``build`` is the one piece of code: a
function ``build(spec, options) -> FeatureSet`` (or its ``"module:function"`` path, imported
when the benchmark runs) that runs the network once per split. Every benchmark, vision,
class split, text or CLIP, is an instance; `oodscope.bench.catalog` lists the registered ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from ..features import Features

__all__ = ["BenchmarkSpec", "FeatureSet", "ProviderOptions", "QUICK_SUBSET", "USER_OPTIONS"]

#: samples per split of a ``--quick`` run, unless a spec says otherwise
QUICK_SUBSET = 2000
#: options a user sets on the command line; a benchmark lists those it uses in ``options``
USER_OPTIONS = ("model", "data_root", "encoder", "finetune", "vlm", "class_names")


@dataclass
class FeatureSet:
    """Every split of one benchmark, as Features from a single pass of the network.

    ``val_ood`` is used only for hyperparameter selection and must not overlap any test set.
    ``covariate`` holds covariate-shifted ID sets (full-spectrum mode counts them as ID).
    ``info`` carries facts for the report: ``id_accuracy``, ``val_ood_description``,
    ``model``, ``timings`` (seconds per extraction), anything else worth showing.
    ``stream`` (optional): `oodscope.bench.stream.StreamStage` s of a shifting stream, scored
    stage by stage after the ordinary test sets (rows with ``mode="stream"``).
    ``detector_kwargs`` maps detector name -> extra constructor arguments (e.g. the model
    for ODIN/GradNorm, the encoder and class names for CLIP detectors). The key ``"*"``
    holds arguments for every detector: each one receives those of its constructor
    parameters it has (``{"model": net, "input_std": std}`` reaches ODIN and GradNorm, not
    MSP), and a detector's own entry overrides ``"*"`` for the same argument. For a detector
    passed as an instance, an argument is filled in only where the instance left it None.
    A ``"model"`` argument anywhere makes the ``"model"`` field available (`fields`).
    """

    train: Features
    val_id: Features
    val_ood: Features
    test_id: Features
    near_ood: dict[str, Features] = field(default_factory=dict)
    far_ood: dict[str, Features] = field(default_factory=dict)
    covariate: dict[str, Features] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    stream: list[Any] = field(default_factory=list)

    def ood_sets(self) -> dict[str, tuple[str, Features]]:
        """``name -> (group, Features)`` for every test OOD set (group: near/far)."""
        out = {k: ("near", v) for k, v in self.near_ood.items()}
        out.update({k: ("far", v) for k, v in self.far_ood.items()})
        return out

    def fields(self) -> set[str]:
        """Fields available for scoring (on the test ID split), what detectors may require.

        Fit-only needs (e.g. labels, or extras a detector reads only in ``fit``) are checked
        against ``train`` when the detector is fitted, so large extras such as CLIP patch
        tokens need not be stored for the training split when no detector fits on them.
        """
        names = {"logits", "features", "labels", "head", *self.test_id.extras, *self.train.extras}
        avail = {n for n in names if self.test_id.has(n) or (n == "labels" and self.train.has(n))}
        if any("model" in kw for kw in self.detector_kwargs.values()):
            avail.add("model")
        return avail


@dataclass(frozen=True)
class ProviderOptions:
    """The options every builder reads, in one object (a builder ignores what it has no use for).

    ``subset`` caps every evaluation split (`cap`); ``quick`` gives it the spec's
    ``quick_subset`` when unset (`for_spec`). ``ood`` restricts the test OOD sets to build
    (`wants`); ``fields`` are the Features fields the chosen detectors read (None: all),
    so a builder stores the raw inputs only when a detector re-runs the network
    (`keep_inputs`); ``detectors`` are the detectors asked for (names or instances, None:
    every registered one), whose extra layers an image builder extracts
    (`oodscope.bench.layers`). ``net``/``net_meta`` pass an in-memory network instead of the
    ``model`` checkpoint (scripts, tests, the training comparison).
    """

    seed: int = 0
    subset: int | None = None
    quick: bool = False
    cache_dir: Path | None = None
    ood: tuple[str, ...] | None = None
    fields: frozenset[str] | None = None
    detectors: tuple[Any, ...] | None = None
    progress: bool = True
    model: str | Path | None = None
    net: Any = None
    net_meta: Mapping[str, Any] | None = None
    data_root: Path | None = None
    encoder: Any = None
    finetune: Any = None
    vlm: Any = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.subset is not None and (isinstance(self.subset, bool) or int(self.subset) < 1):
            raise ValueError(f"subset must be a positive number of samples per split, got {self.subset!r}.")
        for name in ("cache_dir", "data_root"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if isinstance(self.ood, str):
            object.__setattr__(self, "ood", tuple(s.strip() for s in self.ood.split(",") if s.strip()))
        elif self.ood is not None:
            object.__setattr__(self, "ood", tuple(self.ood))
        if self.fields is not None:
            object.__setattr__(self, "fields", frozenset(self.fields))
        if self.detectors is not None:
            object.__setattr__(self, "detectors", tuple(self.detectors))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    @classmethod
    def of(cls, options: "ProviderOptions | Mapping[str, Any] | None", **changes: Any) -> "ProviderOptions":
        """Options from an instance or a dict (``None`` values mean unset), with ``changes``."""
        if isinstance(options, ProviderOptions):
            return replace(options, **changes)
        given = {k: v for k, v in dict(options or {}).items() if v is not None}
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown benchmark option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**{**given, **changes})

    def for_spec(self, spec: "BenchmarkSpec") -> "ProviderOptions":
        """These options with ``quick`` resolved into the spec's subset size."""
        if self.quick and self.subset is None:
            return replace(self, subset=spec.quick_subset)
        return self

    def given(self) -> list[str]:
        """The user options (`USER_OPTIONS`) that are set."""
        return [k for k in USER_OPTIONS if getattr(self, k) is not None]

    def wants(self, name: str) -> bool:
        """Whether test OOD set ``name`` was asked for (all are, without ``ood``)."""
        return self.ood is None or name.lower() in {o.lower() for o in self.ood}

    @property
    def keep_inputs(self) -> bool:
        """Keep the network inputs: a detector re-runs the network (or every field is wanted)."""
        return self.fields is None or bool({"inputs", "model"} & self.fields)

    def wants_field(self, name: str) -> bool:
        return self.fields is None or name in self.fields

    def cap(self, ds: Any) -> Any:
        """At most ``subset`` samples of ``ds`` (a seeded draw, `ImageDataset.sample`)."""
        return ds if self.subset is None or len(ds) <= self.subset else ds.sample(self.subset, seed=self.seed)

    def cache(self, kind: str) -> Path:
        """The cache folder for ``kind`` (features, models, ...) under ``cache_dir``."""
        from ..data.registry import cache_root

        return (self.cache_dir if self.cache_dir is not None else cache_root()) / kind


Builder = Callable[["BenchmarkSpec", ProviderOptions], FeatureSet]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as data. See the module docstring; the fields:

    ``id_set``: what is in-distribution (a line for people). ``near``/``far``/``covariate``:
    the names of the test OOD sets of each group (and the covariate-shifted ID sets); what
    ``--ood`` may select. ``val_ood`` / ``val_ood_reason``: how the validation OOD set is
    made and why it is fair (shown in the report). ``default_detectors``: run when none are
    named (None: every detector the Features can feed). ``quick_subset``: samples per split
    with ``--quick``. ``options``: the user options (`USER_OPTIONS`) the builder uses; any
    other set option is an error. ``params``: keyword arguments of the builder (a protocol,
    a split number, a dataset name). ``vlm_twin``: the benchmark that runs instead when a
    CLIP model is given with ``--vlm``.
    """

    name: str
    description: str
    build: str | Builder
    modality: str = "images"
    id_set: str = ""
    near: tuple[str, ...] = ()
    far: tuple[str, ...] = ()
    covariate: tuple[str, ...] = ()
    val_ood: str = ""
    val_ood_reason: str = ""
    default_detectors: tuple[str, ...] | None = None
    quick_subset: int = QUICK_SUBSET
    options: frozenset[str] = frozenset()
    params: Mapping[str, Any] = field(default_factory=dict)
    vlm_twin: str | None = None

    def __post_init__(self) -> None:
        for name in ("near", "far", "covariate"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.default_detectors is not None:
            object.__setattr__(self, "default_detectors", tuple(self.default_detectors))
        object.__setattr__(self, "options", frozenset(self.options))
        unknown = sorted(self.options - set(USER_OPTIONS))
        if unknown:
            raise ValueError(f"Benchmark {self.name!r}: unknown option(s) {unknown}; known: {list(USER_OPTIONS)}.")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def ood_names(self) -> tuple[str, ...]:
        """Every test OOD set and covariate-shifted ID set, what ``--ood`` may name."""
        return (*self.near, *self.far, *self.covariate)

    def builder(self) -> Builder:
        """The build function (imported from ``"module:function"`` on first use)."""
        if callable(self.build):
            return self.build
        module, _, func = self.build.partition(":")
        return getattr(importlib.import_module(module), func)

    def with_params(self, **params: Any) -> "BenchmarkSpec":
        return replace(self, params={**self.params, **params})

    def check_options(self, options: ProviderOptions) -> None:
        """A user option the benchmark does not use is an error, not silently ignored."""
        unused = [o for o in options.given() if o not in self.options]
        if unused:
            raise ValueError(f"Benchmark {self.name!r} does not use option(s) "
                             f"{', '.join('--' + u.replace('_', '-') for u in unused)}.")

    def check_ood(self, requested: Iterable[str] | None) -> list[str] | None:
        """Validate ``--ood`` names against the spec (before any extraction)."""
        return check_names(requested, self.ood_names) if self.ood_names else None


def check_names(requested: Iterable[str] | str | None, valid: Iterable[str]) -> list[str] | None:
    """``requested`` OOD set names in their canonical spelling; unknown ones raise a
    ``ValueError`` that lists the valid names."""
    if requested is None:
        return None
    if isinstance(requested, str):
        requested = [s.strip() for s in requested.split(",") if s.strip()]
    valid = list(valid)
    lower = {v.lower(): v for v in valid}
    bad = [r for r in requested if r.lower() not in lower]
    if bad:
        raise ValueError(f"Unknown OOD set(s) {bad}; valid names for this benchmark: {sorted(valid)}.")
    return [lower[r.lower()] for r in requested]
