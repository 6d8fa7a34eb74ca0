"""What a benchmark is: a provider of cached `Features` for every split, as data.

A benchmark provider runs the expensive part (a network, an encoder, a CLIP tower) once
and returns a `FeatureSet`. The runner then fits, tunes and scores every detector on those
Features only, so no detector or hyperparameter candidate ever re-runs the network (except
detectors that declare ``requires={"model"}``, which get the model via ``detector_kwargs``).

Vision, text and vision-language benchmarks all register a provider here with
`register_benchmark`, so they share one runner and one report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..features import Features

__all__ = ["FeatureSet", "BenchmarkDef", "register_benchmark", "get_benchmark", "list_benchmarks"]


@dataclass
class FeatureSet:
    """Every split of one benchmark, as Features from a single pass of the network.

    ``val_ood`` is used only for hyperparameter selection and must not overlap any test set.
    ``covariate`` holds covariate-shifted ID sets (full-spectrum mode counts them as ID).
    ``info`` carries facts for the report: ``id_accuracy``, ``val_ood_description``,
    ``model``, ``timings`` (seconds per extraction), anything else worth showing.
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


@dataclass
class BenchmarkDef:
    name: str
    provider: Callable[..., FeatureSet]
    description: str = ""
    default_detectors: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


_BENCHMARKS: dict[str, BenchmarkDef] = {}


def register_benchmark(
    name: str,
    provider: Callable[..., FeatureSet],
    description: str = "",
    default_detectors: list[str] | None = None,
    **options: Any,
) -> BenchmarkDef:
    """Register ``provider(**kwargs) -> FeatureSet`` under ``name``."""
    bd = BenchmarkDef(name, provider, description, default_detectors, options)
    _BENCHMARKS[name.lower()] = bd
    return bd


_PROVIDER_MODULES = (
    "oodscope.bench.vision",
    "oodscope.bench.classsplit",
    "oodscope.text.benchmark",
    "oodscope.vlm.benchmark",
)


def _load_providers() -> None:
    import importlib

    for mod in _PROVIDER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name not in (mod, mod.rsplit(".", 1)[0]):
                raise


def get_benchmark(name: str) -> BenchmarkDef:
    _load_providers()
    key = name.lower()
    if key not in _BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available: {sorted(_BENCHMARKS)}.")
    return _BENCHMARKS[key]


def list_benchmarks() -> list[str]:
    _load_providers()
    return sorted(_BENCHMARKS)
