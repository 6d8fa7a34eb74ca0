"""Running a network once per split of a benchmark, timed, and getting that network.

`SplitExtractor` is the part every modality shares: it calls the modality's extractor for a
named split, records how long it took and whether the result came from the cache, and gives
unlabelled sets the label ``-1``. `ImageExtractor` runs an image classifier
(`oodscope.extract`); the CLIP one lives in `oodscope.bench.clip`, text has its own encoder
cache (`oodscope.text.encoders.encode_cached`). All three key their caches with
`oodscope._cache.cache_key`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..features import Features
from .spec import ProviderOptions

__all__ = ["ImageExtractor", "SplitExtractor", "check_model", "load_network", "model_normalization"]


class SplitExtractor:
    """Calls `_extract(name, data)` per split; keeps ``timings`` and ``from_cache``."""

    def __init__(self, cache: Path | None, progress: bool = True):
        self.cache = cache
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.from_cache: list[str] = []

    def __call__(self, name: str, data: Any) -> Features:
        before = self._cached_files()
        t0 = time.perf_counter()
        f = self._extract(name, data)
        if f.labels is None:
            f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
        self.timings[name] = time.perf_counter() - t0
        if self.cache is not None and self._cached_files() == before:
            self.from_cache.append(name)
        return f

    def _extract(self, name: str, data: Any) -> Features:
        raise NotImplementedError

    def _cached_files(self) -> int:
        return len(list(self.cache.glob("*.npz"))) if self.cache is not None and self.cache.exists() else 0

    def info(self) -> dict[str, Any]:
        """``timings`` and ``timings_from_cache`` for ``FeatureSet.info``."""
        return {"timings": dict(self.timings), "timings_from_cache": list(self.from_cache)}


class ImageExtractor(SplitExtractor):
    """An image classifier over `ImageDataset` splits, normalised with ``mean``/``std``;
    ``layers`` (``{module: pooling}``, `oodscope.bench.layers.layer_plan`) are stored as extras
    ``"layer:<module>"`` in the same pass."""

    def __init__(self, model: Any, mean: Any, std: Any, options: ProviderOptions, batch_size: int = 512,
                 cache: bool = True, layers: dict[str, str | None] | None = None):
        super().__init__(options.cache("features") if cache else None, options.progress)
        self.model, self.mean, self.std = model, mean, std
        self.keep_inputs = options.keep_inputs
        self.batch_size = batch_size
        self.layers = dict(layers or {})

    def _extract(self, name: str, ds: Any) -> Features:
        from .. import data as D
        from ..extraction import extract

        loader = D.loader(ds, batch_size=self.batch_size, shuffle=False, mean=self.mean, std=self.std)
        return extract(self.model, loader, layers=list(self.layers), layer_pooling=self.layers,
                       keep_inputs=self.keep_inputs, cache_dir=self.cache, progress=self.progress,
                       desc=f"extract {name}")


def check_model(model, num_classes: int, in_shape: tuple[int, ...], source: str) -> None:
    """A clear error when a network does not fit the benchmark (input shape / classes)."""
    import torch

    from .._outputs import logits_of

    try:
        p = next(model.parameters())
        x = torch.zeros((2, *in_shape), dtype=p.dtype, device=p.device)
    except StopIteration:
        x = torch.zeros((2, *in_shape))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ValueError(
            f"The model from {source} cannot process this benchmark's inputs of shape "
            f"{tuple(in_shape)} (channels, height, width): {type(exc).__name__}: {exc}. "
            "Is the checkpoint for this benchmark?") from None
    finally:
        model.train(was)
    logits = logits_of(out)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"The model from {source} outputs {tuple(logits.shape[1:])} logits per input but this "
            f"benchmark has {num_classes} classes; the checkpoint does not match the benchmark.")


def model_normalization(meta: dict | None, default_mean: Any, default_std: Any) -> tuple[Any, Any]:
    """The input ``(mean, std)`` a checkpoint was trained with.

    Reads ``meta["normalization"] = {"mean": ..., "std": ...}`` (what
    `oodscope.train.reference_model` and `oodscope.train.fit` store), else top-level
    ``meta["mean"]``/``meta["std"]``, else the given defaults.
    """
    meta = meta or {}
    norm = meta.get("normalization")
    norm = norm if isinstance(norm, dict) else {}
    mean = norm.get("mean", meta.get("mean"))
    std = norm.get("std", meta.get("std"))
    return (default_mean if mean is None else mean), (default_std if std is None else std)


def load_network(options: ProviderOptions, default: Callable[[], tuple[Any, dict, str]] | None = None,
                 benchmark: str = "this benchmark") -> tuple[Any, dict, str]:
    """``(network, meta, source)``: the in-memory ``options.net``, the ``options.model``
    checkpoint (oodscope safetensors + JSON, or a TorchScript file), else ``default()``."""
    if options.net is not None:
        return options.net, dict(options.net_meta or {}), "the given network"
    if options.model is not None:
        net, meta = load_model_file(options.model)
        return net, dict(meta or {}), str(options.model)
    if default is None:
        raise ValueError(f"Benchmark {benchmark!r} evaluates your network: pass --model path/to/checkpoint.")
    return default()


def load_model_file(path: str | Path) -> tuple[Any, dict]:
    """A checkpoint written by `oodscope.models.save_checkpoint` (``.safetensors`` + ``.json``,
    objectives that extend the network replayed), or a TorchScript file (``torch.jit.save``)."""
    import torch

    from ..train.checkpoint import load_checkpoint

    path = Path(path)
    weights = path.with_suffix(".safetensors")
    if path.suffix in (".safetensors", ".json") or (not path.exists() and weights.exists()):
        return load_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {str(path)!r}: no such file.")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval(), {}
    except RuntimeError as exc:
        raise ValueError(f"--model {path}: neither an oodscope checkpoint (.safetensors + .json) nor a "
                         f"TorchScript file ({str(exc).splitlines()[0][:200]}).") from None
