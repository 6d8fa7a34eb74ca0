"""Benchmarks: definitions as data, a one-pass runner, validation tuning and reports."""

from .spec import FeatureSet, get_benchmark, list_benchmarks, register_benchmark

__all__ = ["FeatureSet", "get_benchmark", "list_benchmarks", "register_benchmark"]
