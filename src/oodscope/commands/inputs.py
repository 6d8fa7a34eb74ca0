"""Reading feature files given on the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..features import Features

_FIELDS = ("features", "logits", "labels", "head_weight", "head_bias")


def read_features(path: str | Path, what: str = "--features") -> Features:
    """A `Features` file (``Features.save``), a plain ``.npz`` whose members are named after
    fields (``features``, ``logits``, ``labels``, ``head_weight``, ``head_bias``; any other
    name becomes an extra), or a ``.npy`` array of penultimate features."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: no such file or directory.")
    if p.is_dir() or p.suffix == ".npz" and _has_meta(p):
        return Features.load(p)
    try:
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{what} {p}: not a readable .npy/.npz file ({exc}).") from None
    if isinstance(data, np.ndarray):
        return Features(features=data)
    with data:
        arrays = {k: data[k] for k in data.files}
    if not arrays:
        raise ValueError(f"{what} {p}: the archive is empty.")
    fields = {k: arrays.pop(k) for k in _FIELDS if k in arrays}
    return Features(**fields, extras=arrays)


def _has_meta(p: Path) -> bool:
    try:
        with np.load(p, allow_pickle=False) as data:
            return "__meta__" in data.files
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{p}: not a readable .npz file ({exc}).") from None


def parse_params(items: list[str] | None) -> dict:
    """``["k=10", "index=ivf"]`` -> ``{"k": 10, "index": "ivf"}`` (values read as JSON when
    they parse, else kept as strings)."""
    import json

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE.")
        name, value = item.split("=", 1)
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    return out
