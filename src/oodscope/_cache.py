"""The one cache-key function of the three extractors (images, text, CLIP).

A cached result is stored under ``cache_key(parts)``: the first 32 hex digits of the SHA-256
of ``parts`` as sorted JSON, where ``parts`` holds the model's fingerprint, the data's
fingerprint and every option that changes the result. `fingerprint` hashes arrays and
strings (shape, dtype and bytes), so equal data gives equal keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["cache_key", "cached", "file_sha256", "fingerprint"]


def cache_key(parts: Mapping[str, Any]) -> str:
    """32 hex digits identifying ``parts`` (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def fingerprint(items: Iterable[Any]) -> str:
    """24 hex digits over a sequence of arrays, tensors or strings (``None`` items skipped)."""
    h = hashlib.sha256()
    for part in items:
        if part is None:
            continue
        if isinstance(part, str):
            h.update(part.encode("utf-8") + b"\x00")
            continue
        arr = part.detach().cpu().numpy() if hasattr(part, "detach") else np.asarray(part)
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:24]


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(path: Path | None, load: Callable[[Path], Any], compute: Callable[[], Any],
           save: Callable[[Any, Path], None]) -> Any:
    """``load(path)`` when it exists, else ``compute()`` saved with ``save(result, path)``;
    without a path, just ``compute()``."""
    if path is not None and path.exists():
        return load(path)
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(result, path)
    return result
