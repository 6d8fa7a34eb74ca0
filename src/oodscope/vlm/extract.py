"""Run a dual encoder's image tower once over data and keep the embeddings as `Features`.

The result carries ``extras["image_embeds"]`` (N, D), optionally ``extras["local_embeds"]``
(N, P, D) for GL-MCM, and ``labels`` when the data has them. Like `oodscope.extract`, a
``cache_dir`` stores the result as ``.npz`` keyed by (model weights, data, options), so a
benchmark runs the image tower once for every VLM detector and every hyperparameter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._cache import cache_key as key_of
from .._cache import cached, fingerprint
from ..features import Features
from .backends import DualEncoder, load

__all__ = ["extract", "iter_image_batches"]


def _is_image_item(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (Image.Image, str, os.PathLike))


def _open(item: Any):
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return img.convert("RGB")
    return item


def iter_image_batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(images, labels_or_None)`` batches.

    ``data`` may be: a list of PIL images or file paths; a list of ``(image, label)`` pairs;
    an array/tensor of images (first axis = samples); a tuple ``(images, labels)``; or an
    iterable of batches (a DataLoader) yielding ``x``, ``(x, y)`` or dicts.
    """
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[1], "__len__") and not _is_image_item(data[1]):
        X, y = data
        if len(X) != len(y):
            raise ValueError(f"Images and labels differ in length: {len(X)} vs {len(y)}.")
        for i in range(0, len(X), batch_size):
            xb = X[i : i + batch_size]
            if isinstance(xb, (list, tuple)):
                xb = [_open(item) for item in xb]
            yield xb, np.asarray(y[i : i + batch_size])
        return
    if hasattr(data, "ndim") and hasattr(data, "shape"):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size], None
        return
    if isinstance(data, (list, tuple)) and data and (
        _is_image_item(data[0])
        or (isinstance(data[0], (list, tuple)) and len(data[0]) == 2 and _is_image_item(data[0][0]))
    ):
        for i in range(0, len(data), batch_size):
            chunk = data[i : i + batch_size]
            if _is_image_item(chunk[0]):
                yield [_open(c) for c in chunk], None
            else:
                yield [_open(c[0]) for c in chunk], np.asarray([c[1] for c in chunk])
        return
    for item in data:
        if isinstance(item, dict):
            x = item.get("x", item.get("image", item.get("pixel_values", item.get("input"))))
            yield x, item.get("y", item.get("label", item.get("labels")))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            yield item[0], item[1]
        else:
            yield item, None


def _looks_preprocessed(x: Any, size: int) -> bool:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        return False
    return "float" in str(dtype)


def _data_fingerprint(data: Any, batch_size: int) -> str:
    paths, labels = data, None
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (list, tuple)):
        paths, labels = data
    if isinstance(paths, (list, tuple)) and paths and isinstance(paths[0], (str, os.PathLike)):
        # paths: hash names, sizes and modification times, not pixels
        stats = (f"{os.fspath(p)}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}" for p in paths)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        return fingerprint([*stats, labels])
    return fingerprint(part for x, y in iter_image_batches(data, batch_size)
                       for part in [*(x if isinstance(x, list) else [x]), y])


def extract(
    encoder: DualEncoder | str,
    data: Any,
    *,
    local: bool = False,
    batch_size: int = 64,
    preprocessed: bool | str = "auto",
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    local_dtype: str = "float16",
    progress: bool = True,
    desc: str = "embed images",
) -> Features:
    """Embed images with ``encoder`` and return `Features` with ``extras["image_embeds"]``.

    Parameters
    ----------
    encoder : a `DualEncoder` or a model string for `oodscope.vlm.load`.
    data : images (see `iter_image_batches`): PIL images, file paths, arrays, (X, y), loaders.
    local : also keep local patch embeddings ``extras["local_embeds"]`` (N, P, D) (GL-MCM).
        They are large (196 x 512 per image for ViT-B/16), stored as ``local_dtype``.
    preprocessed : ``True`` if batches are already CLIP-normalised (N, 3, S, S) float
        tensors; ``False`` to always run `DualEncoder.preprocess`; ``"auto"`` treats 4-D
        float batches of the model's input size as preprocessed.
    cache_dir, cache_key : store/reuse the result keyed by model weights and data (or your
        ``cache_key``, which you vouch identifies the data).
    """
    encoder = load(encoder)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    path = None
    if cache_dir is not None:
        key = key_of({
            "model": encoder.fingerprint,
            "data": cache_key or _data_fingerprint(data, batch_size),
            "local": bool(local),
            "local_mode": getattr(encoder, "local_mode", None),
            "local_dtype": local_dtype,
            "size": encoder.image_size,
        })
        path = Path(cache_dir) / f"vlm-features-{key}.npz"
    return cached(path, Features.load, lambda: _embed(encoder, data, local, batch_size, preprocessed,
                                                      local_dtype, progress, desc),
                  lambda f, p: f.save(p))


def _embed(encoder: DualEncoder, data: Any, local: bool, batch_size: int, preprocessed: bool | str,
           local_dtype: str, progress: bool, desc: str) -> Features:
    from tqdm.auto import tqdm

    try:
        total = len(data[0]) if isinstance(data, tuple) and len(data) == 2 else len(data)
    except TypeError:
        total = None
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    globals_, locals_, labels = [], [], []
    any_labels = None
    for x, y in iter_image_batches(data, batch_size):
        use_raw = preprocessed is False or (preprocessed == "auto" and not _looks_preprocessed(x, encoder.image_size))
        pixels = encoder.preprocess(x) if use_raw else x
        g, loc = encoder.encode_images(pixels, local=local)
        globals_.append(g)
        if local:
            locals_.append(loc.astype(local_dtype))
        has_y = y is not None
        if any_labels is None:
            any_labels = has_y
        elif any_labels != has_y:
            raise ValueError("Some batches have labels and others do not; give labels for all or none.")
        if has_y:
            yy = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
            labels.append(yy.astype(np.int64).reshape(-1))
        bar.update(len(g))
    bar.close()
    if not globals_:
        raise ValueError("vlm.extract got no images: the data source yielded no batches.")
    extras = {"image_embeds": np.concatenate(globals_)}
    if local:
        extras["local_embeds"] = np.concatenate(locals_)
    return Features(
        labels=np.concatenate(labels) if any_labels else None,
        extras=extras,
        meta={"model": encoder.name, "embed_dim": encoder.embed_dim},
    )
