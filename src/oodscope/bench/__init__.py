"""Benchmarks: definitions as data (`BenchmarkSpec`, one catalog), a one-pass runner,
validation tuning and reports.

`run_benchmark` and `BenchResult` (from `oodscope.bench.runner`) are imported on first use,
so ``import oodscope.bench`` stays light (no torch, no pandas).
"""

from typing import Any

from .catalog import get_benchmark, list_benchmarks, register_benchmark
from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["BenchResult", "BenchmarkSpec", "FeatureSet", "ProviderOptions", "get_benchmark", "list_benchmarks",
           "register_benchmark", "run_benchmark"]

_LAZY = {"run_benchmark": "runner", "BenchResult": "results"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
