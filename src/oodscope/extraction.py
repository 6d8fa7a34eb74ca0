"""Run a torch model once over data and collect `Features` (with an optional disk cache).

What is collected:

* ``logits``: the model output (a tensor, the first item of a tuple, or ``out["logits"]``);
  other per-sample tensors in a dict output (e.g. a learned temperature) become extras;
* ``features``: the input of the classifier head (a forward pre-hook on the last linear
  layer), or ``model.forward_features(x)`` when the model has one and no layer is named, or
  the flattened output of the module named by ``penultimate``;
* ``head_weight`` / ``head_bias``: the last linear layer, so activation-shaping detectors
  work from cached features without touching the network again;
* ``labels`` when the data yields ``(x, y)`` pairs; extra layers named in ``layers``;
  the raw inputs when ``keep_inputs=True`` (for detectors that must re-run the network).

The network runs under ``torch.no_grad()`` in eval mode, batched, with a progress bar.
With ``cache_dir`` the result is stored under a key made of the model's parameters and the
data's bytes, so a second call with the same model and data does not run the model.
With ``out_dir`` every array is streamed to ``.npy`` files chunk by chunk and returned
memory-mapped, so a dataset larger than RAM can be extracted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ._cache import cache_key as cache_key_of
from ._cache import cached, fingerprint
from ._outputs import output_tensors
from .features import Features

__all__ = ["extract", "find_head", "model_fingerprint"]


def _torch():
    import torch

    return torch


def find_head(model, head: str | None = None):
    """Return ``(name, module)`` of the classifier head (an ``nn.Linear``)."""
    torch = _torch()
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise ValueError(f"No module named {head!r} in the model; available: {list(modules)[:30]}")
        mod = modules[head]
        if not isinstance(mod, torch.nn.Linear):
            raise ValueError(f"Head {head!r} is a {type(mod).__name__}, not an nn.Linear.")
        return head, mod
    if hasattr(model, "get_classifier"):  # timm convention
        clf = model.get_classifier()
        for name, mod in modules.items():
            if mod is clf and isinstance(mod, torch.nn.Linear):
                return name, mod
    for attr in ("fc", "head", "classifier", "linear", "last_linear"):
        mod = getattr(model, attr, None)
        if isinstance(mod, torch.nn.Linear):
            return attr, mod
    linears = [(n, m) for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return None, None
    return linears[-1]


def model_fingerprint(model) -> str:
    """SHA-256 over the model's class name, parameter names, shapes and values."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(str(tuple(arr.shape)).encode() + str(arr.dtype).encode())
        h.update(arr.view(-1).view(_torch().uint8).numpy().tobytes() if arr.numel() else b"")
    return h.hexdigest()[:24]


def _batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(x, y_or_None)`` from arrays, tensors, tuples ``(X, y)``, loaders or iterables."""
    torch = _torch()
    if isinstance(data, (np.ndarray, torch.Tensor)):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size], None
        return
    if isinstance(data, tuple) and len(data) == 2 and all(
        isinstance(d, (np.ndarray, torch.Tensor)) for d in data
    ):
        X, y = data
        if len(X) != len(y):
            raise ValueError(f"Inputs and labels differ in length: {len(X)} vs {len(y)}.")
        for i in range(0, len(X), batch_size):
            yield X[i : i + batch_size], y[i : i + batch_size]
        return
    for item in data:
        if isinstance(item, dict):
            x = item.get("x", item.get("input", item.get("image", item.get("pixel_values"))))
            yield x, item.get("y", item.get("label", item.get("labels")))
        elif isinstance(item, (list, tuple)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def _data_len(data: Any) -> int | None:
    if isinstance(data, tuple) and len(data) == 2:
        return len(data[0])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else len(data)
    except TypeError:
        return None


def _data_fingerprint(data: Any, batch_size: int) -> str:
    return fingerprint(part for x, y in _batches(data, batch_size) for part in (x, y))


class _Sink:
    """Accumulates per-sample arrays in RAM, or streams them to ``.npy`` chunk files."""

    def __init__(self, out_dir: Path | None, chunk_size: int):
        self.out_dir = out_dir
        self.chunk_size = chunk_size
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.buffered = 0
        self.chunks: dict[str, list[Path]] = {}
        if out_dir is not None:
            (out_dir / "_chunks").mkdir(parents=True, exist_ok=True)

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for k, v in arrays.items():
            self.buffers.setdefault(k, []).append(v)
        self.buffered += len(next(iter(arrays.values())))
        if self.out_dir is not None and self.buffered >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        for k, parts in self.buffers.items():
            idx = len(self.chunks.setdefault(k, []))
            path = self.out_dir / "_chunks" / f"{k}.{idx:06d}.npy"
            np.save(path, np.concatenate(parts), allow_pickle=False)
            self.chunks[k].append(path)
        self.buffers = {}
        self.buffered = 0

    def finish(self) -> dict[str, np.ndarray]:
        if self.out_dir is None:
            return {k: np.concatenate(v) for k, v in self.buffers.items()}
        if self.buffered:
            self._flush()
        out = {}
        for k, paths in self.chunks.items():
            heads = [np.load(p, mmap_mode="r") for p in paths]
            n = sum(a.shape[0] for a in heads)
            target = self.out_dir / f"{k}.npy"
            mm = np.lib.format.open_memmap(target, mode="w+", dtype=heads[0].dtype, shape=(n, *heads[0].shape[1:]))
            pos = 0
            for a in heads:
                mm[pos : pos + a.shape[0]] = a
                pos += a.shape[0]
            mm.flush()
            del mm, heads
            out[k] = np.load(target, mmap_mode="r")
        shutil.rmtree(self.out_dir / "_chunks", ignore_errors=True)
        return out


class _Capture:
    """Forward hooks that record, per batch, the penultimate features and extra layers.

    Features are the input of the head (``nn.Linear``) by default, the flattened output of
    ``penultimate`` when named, or ``model.forward_features(x)`` for a model without a head
    that has it. ``features_are_head_input`` stays true while the named penultimate output
    equals the head's input, so the head's weights may travel with the features.
    """

    def __init__(self, model, head_mod, penultimate: str | None, layers: Sequence[str],
                 pooling: Mapping[str, str | None] | None = None):
        modules = dict(model.named_modules())
        for name in [penultimate, *layers]:
            if name is not None and name not in modules:
                raise ValueError(f"No module named {name!r} in the model. Some valid names: "
                                 f"{[n for n in modules if n][:40]}")
        self.model = model
        self.captured: dict[str, Any] = {}
        self.features_are_head_input = True
        self.use_forward_features = penultimate is None and head_mod is None and hasattr(model, "forward_features")
        put = self.captured.__setitem__
        self.hooks = []
        if penultimate is not None:
            self.hooks.append(modules[penultimate].register_forward_hook(lambda m, i, o: put("features", o)))
        elif head_mod is not None:
            self.hooks.append(head_mod.register_forward_pre_hook(lambda m, i: put("features", i[0])))
        if penultimate is not None and head_mod is not None:
            self.hooks.append(head_mod.register_forward_pre_hook(lambda m, i: put("head_input", i[0])))
        for name in layers:
            self.hooks.append(modules[name].register_forward_hook(self._layer_hook(name, (pooling or {}).get(name))))

    def _layer_hook(self, name: str, how: str | None):
        def hook(module, inputs, output):
            self.captured[f"layer:{name}"] = _pooled(output, how)

        return hook

    def run(self, x) -> dict[str, Any]:
        """The model's outputs for one batch plus what the hooks captured (tensors)."""
        self.captured.clear()
        if self.use_forward_features:
            feats = self.model.forward_features(x)
            batch = output_tensors(self.model(x))
            self.captured["features"] = feats
        else:
            batch = output_tensors(self.model(x))
        if "head_input" in self.captured and self.features_are_head_input:
            pen, hin = self.captured["features"], self.captured["head_input"]
            self.features_are_head_input = pen.numel() == hin.numel() and _torch().equal(pen.reshape(hin.shape), hin)
        batch.update({k: v for k, v in self.captured.items() if k == "features" or k.startswith("layer:")})
        return batch

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _pooled(t, how: str | None):
    """A layer's batch output pooled per channel right away (a whole map for ``None``)."""
    if how is None:
        return t
    from .detectors._network import torch_pool

    return torch_pool(t.double(), how)


def _to_numpy(batch: dict[str, Any], y, x, keep_inputs: bool, fdtype: np.dtype) -> dict[str, np.ndarray]:
    arrays = {}
    for k, v in batch.items():
        t = v.detach().float().cpu()
        if k == "features":
            arrays[k] = t.reshape(t.shape[0], -1).numpy().astype(fdtype)
        else:
            arrays[k] = t.numpy()
    if y is not None:
        yy = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
        arrays["labels"] = yy.astype(np.int64).reshape(-1)
    if keep_inputs:
        arrays["inputs"] = x.detach().cpu().numpy()
    return arrays


def _run_model(model, data, capture: _Capture, sink: _Sink, batch_size: int, device: str | None,
               keep_inputs: bool, fdtype: np.dtype, progress: bool, desc: str) -> None:
    """Every batch through the model, in eval mode and without gradients, into ``sink``."""
    torch = _torch()
    from tqdm.auto import tqdm

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = device or (str(param.device) if param is not None else "cpu")
    input_dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    bar = tqdm(total=_data_len(data), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for x, y in _batches(data, batch_size):
                xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
                if xt.is_floating_point() and xt.dtype != input_dtype:
                    xt = xt.to(input_dtype)  # float64 arrays into a float32 model, or the reverse
                xt = xt.to(device)
                sink.add(_to_numpy(capture.run(xt), y, xt, keep_inputs, fdtype))
                bar.update(int(xt.shape[0]))
    finally:
        bar.close()
        model.train(was_training)


def _head_arrays(head_mod, features: np.ndarray | None, features_are_head_input: bool):
    """The head's weight and bias, when the stored features really are its input."""
    if head_mod is None or not features_are_head_input:
        return None, None
    hw = head_mod.weight.detach().float().cpu().numpy()
    if features is not None and features.shape[1] != hw.shape[1]:
        return None, None  # a named penultimate layer that is not the head's input
    hb = head_mod.bias.detach().float().cpu().numpy() if head_mod.bias is not None else None
    return hw, hb


def _write_out_dir(out_dir: Path, feats: Features) -> Features:
    """Write the head and metadata beside the streamed arrays; reload memory-mapped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("head_weight", "head_bias"):
        arr = getattr(feats, name)
        if arr is not None:
            np.save(out_dir / f"{name}.npy", arr)
    for k in feats.extras:
        (out_dir / f"{k}.npy").rename(out_dir / f"extra__{k}.npy")
    (out_dir / "meta.json").write_text(json.dumps({"format": "oodscope.Features", "version": 1, "meta": feats.meta}))
    return Features.load(out_dir, mmap=True)


def _check_pooling(layers: Sequence[str], pooling: Mapping[str, str | None] | None) -> None:
    if not pooling:
        return
    stray = sorted(set(pooling) - set(layers))
    if stray:
        raise ValueError(f"layer_pooling names {stray}, which are not in layers={list(layers)}; "
                         "pool only layers that are extracted.")
    bad = {k: v for k, v in pooling.items() if v not in ("mean", "stat", None)}
    if bad:
        raise ValueError(f"layer_pooling values must be 'mean', 'stat' or None, got {bad}.")


def extract(
    model,
    data: Any,
    *,
    head: str | None = None,
    penultimate: str | None = None,
    layers: Sequence[str] = (),
    layer_pooling: Mapping[str, str | None] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    keep_inputs: bool = False,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    out_dir: str | Path | None = None,
    chunk_size: int = 65536,
    feature_dtype: str = "float32",
    progress: bool = True,
    desc: str = "extract",
) -> Features:
    """Run ``model`` once over ``data`` and return `Features`.

    Parameters
    ----------
    model : torch.nn.Module
    data : DataLoader, iterable of batches (``x`` or ``(x, y)`` or dicts), array/tensor of
        inputs, or a tuple ``(X, y)`` of arrays.
    head : name of the final ``nn.Linear``; found automatically when omitted.
    penultimate : name of a module whose (flattened) output is the feature vector; by
        default the input of the head is used.
    layers : names of extra modules whose outputs are stored as extras ``"layer:<name>"``.
    layer_pooling : ``{name: "mean" | "stat"}`` pools those layers' maps per channel batch by
        batch (`oodscope.detectors._network.pool_layer`), so only ``(N, C)`` / ``(N, 2C)``
        arrays are kept instead of whole feature maps; layers not named keep their maps.
    keep_inputs : also store the inputs as extra ``"inputs"`` (ODIN, GradNorm need them).
    cache_dir : store/reuse the result under a key of model parameters and data bytes.
    cache_key : use this string instead of hashing the data (you vouch it identifies it).
    out_dir : stream arrays to ``out_dir/*.npy`` in chunks and return them memory-mapped.
    feature_dtype : ``"float32"`` or ``"float16"`` for the stored penultimate features.
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"extract needs a torch.nn.Module, got {type(model).__name__}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if cache_dir is not None and cache_key is None and isinstance(data, Iterator):
        raise ValueError(
            "extract with cache_dir hashes the data before running the model, which would use "
            "up a one-shot iterator (a generator). Pass cache_key='<name of this data>' or a "
            "re-iterable source (array, list of batches, DataLoader)."
        )
    _check_pooling(layers, layer_pooling)
    head_name, head_mod = find_head(model, head)
    path = None
    if cache_dir is not None:
        key = cache_key_of({
            "model": model_fingerprint(model), "data": cache_key or _data_fingerprint(data, batch_size),
            "head": head_name, "penultimate": penultimate, "layers": list(layers),
            **({"layer_pooling": {k: layer_pooling[k] for k in sorted(layer_pooling)}} if layer_pooling else {}),
            "keep_inputs": keep_inputs, "dtype": feature_dtype,
        })
        path = Path(cache_dir) / f"features-{key}.npz"

    def compute() -> Features:
        capture = _Capture(model, head_mod, penultimate, layers, layer_pooling)
        sink = _Sink(Path(out_dir) if out_dir is not None else None, chunk_size)
        try:
            _run_model(model, data, capture, sink, batch_size, device, keep_inputs, np.dtype(feature_dtype),
                       progress, desc)
        finally:
            capture.remove()
        arrays = sink.finish()
        if not arrays:
            raise ValueError("extract got no data: the data source yielded no batches.")
        hw, hb = _head_arrays(head_mod, arrays.get("features"), capture.features_are_head_input)
        feats = Features(
            logits=arrays.get("logits"), features=arrays.get("features"), labels=arrays.get("labels"),
            head_weight=hw, head_bias=hb,
            extras={k: v for k, v in arrays.items() if k not in ("logits", "features", "labels")},
            meta={"model": type(model).__name__, "head": head_name, "penultimate": penultimate},
        )
        return _write_out_dir(Path(out_dir), feats) if out_dir is not None else feats

    return cached(path, Features.load, compute, lambda f, p: f.save(p))
