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
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

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
    h = hashlib.sha256()
    for x, y in _batches(data, batch_size):
        for part in (x, y):
            if part is None:
                continue
            arr = part.detach().cpu().numpy() if hasattr(part, "detach") else np.asarray(part)
            h.update(str(arr.shape).encode() + str(arr.dtype).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:24]


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


def extract(
    model,
    data: Any,
    *,
    head: str | None = None,
    penultimate: str | None = None,
    layers: Sequence[str] = (),
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
    head_name, head_mod = find_head(model, head)

    cache_path = None
    if cache_dir is not None and cache_key is None and isinstance(data, Iterator):
        raise ValueError(
            "extract with cache_dir hashes the data before running the model, which would use "
            "up a one-shot iterator (a generator). Pass cache_key='<name of this data>' or a "
            "re-iterable source (array, list of batches, DataLoader)."
        )
    if cache_dir is not None:
        key_parts = {
            "model": model_fingerprint(model),
            "data": cache_key or _data_fingerprint(data, batch_size),
            "head": head_name,
            "penultimate": penultimate,
            "layers": list(layers),
            "keep_inputs": keep_inputs,
            "dtype": feature_dtype,
        }
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
        cache_path = Path(cache_dir) / f"features-{key}.npz"
        if cache_path.exists():
            return Features.load(cache_path)

    modules = dict(model.named_modules())
    for name in [penultimate, *layers]:
        if name is not None and name not in modules:
            raise ValueError(
                f"No module named {name!r} in the model. Some valid names: "
                f"{[n for n in modules if n][:40]}"
            )

    captured: dict[str, Any] = {}
    hooks = []
    use_forward_features = penultimate is None and head_mod is None and hasattr(model, "forward_features")
    if penultimate is not None:
        hooks.append(modules[penultimate].register_forward_hook(
            lambda m, i, o: captured.__setitem__("features", o)))
    elif head_mod is not None:
        hooks.append(head_mod.register_forward_pre_hook(
            lambda m, i: captured.__setitem__("features", i[0])))
    if penultimate is not None and head_mod is not None:
        # the head travels with the features only if they really are its input
        hooks.append(head_mod.register_forward_pre_hook(
            lambda m, i: captured.__setitem__("head_input", i[0])))
    features_are_head_input = True
    for name in layers:
        hooks.append(modules[name].register_forward_hook(
            lambda m, i, o, _n=name: captured.__setitem__(f"layer:{_n}", o)))

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = str(param.device) if param is not None else "cpu"
    input_dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    sink = _Sink(Path(out_dir) if out_dir is not None else None, chunk_size)
    fdtype = np.dtype(feature_dtype)
    total = _data_len(data)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
        with torch.no_grad():
            for x, y in _batches(data, batch_size):
                xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
                if xt.is_floating_point() and xt.dtype != input_dtype:
                    xt = xt.to(input_dtype)  # float64 arrays into a float32 model, or the reverse
                xt = xt.to(device)
                captured.clear()
                if use_forward_features:
                    feats = model.forward_features(xt)
                    out = model(xt)
                    captured["features"] = feats
                else:
                    out = model(xt)
                batch = _split_output(out)
                if "head_input" in captured and features_are_head_input:
                    pen, hin = captured["features"], captured["head_input"]
                    features_are_head_input = pen.numel() == hin.numel() and torch.equal(
                        pen.reshape(hin.shape), hin)
                if "features" in captured:
                    batch["features"] = captured["features"]
                for k, v in captured.items():
                    if k.startswith("layer:"):
                        batch[k] = v
                arrays = {}
                for k, v in batch.items():
                    t = v.detach().float().cpu()
                    if k == "features":
                        t = t.reshape(t.shape[0], -1)
                    arr = t.numpy()
                    arrays[k] = arr.astype(fdtype) if k == "features" else arr
                if y is not None:
                    yy = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
                    arrays["labels"] = yy.astype(np.int64).reshape(-1)
                if keep_inputs:
                    arrays["inputs"] = xt.detach().cpu().numpy()
                sink.add(arrays)
                bar.update(int(xt.shape[0]))
        bar.close()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    arrays = sink.finish()
    if not arrays:
        raise ValueError("extract got no data: the data source yielded no batches.")
    extras = {k: v for k, v in arrays.items() if k not in ("logits", "features", "labels")}
    hw = hb = None
    if head_mod is not None:
        hw = head_mod.weight.detach().float().cpu().numpy()
        hb = head_mod.bias.detach().float().cpu().numpy() if head_mod.bias is not None else None
        if not features_are_head_input or (
            "features" in arrays and arrays["features"].shape[1] != hw.shape[1]
        ):
            hw = hb = None  # a named penultimate layer that is not the head's input
    meta = {"model": type(model).__name__, "head": head_name, "penultimate": penultimate}
    feats = Features(
        logits=arrays.get("logits"),
        features=arrays.get("features"),
        labels=arrays.get("labels"),
        head_weight=hw,
        head_bias=hb,
        extras=extras,
        meta=meta,
    )
    if out_dir is not None:
        # write the head and metadata beside the streamed arrays; reload memory-mapped
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name, arr in (("head_weight", hw), ("head_bias", hb)):
            if arr is not None:
                np.save(Path(out_dir) / f"{name}.npy", arr)
        for k in extras:
            (Path(out_dir) / f"{k}.npy").rename(Path(out_dir) / f"extra__{k}.npy")
        (Path(out_dir) / "meta.json").write_text(
            json.dumps({"format": "oodscope.Features", "version": 1, "meta": meta}))
        feats = Features.load(out_dir, mmap=True)
    if cache_path is not None:
        feats.save(cache_path)
    return feats


def _split_output(out: Any) -> dict[str, Any]:
    torch = _torch()
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"Model returned a dict without 'logits' (keys: {list(out)}).")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    from ._outputs import logits_of

    return {"logits": logits_of(out)}


def iter_chunks(n: int, chunk: int) -> Iterable[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))
