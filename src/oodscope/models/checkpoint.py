"""Checkpoints without pickle: weights in safetensors, everything else in a JSON sidecar.

``save_checkpoint(model, "run/model.safetensors", meta)`` writes ``model.safetensors`` and
``model.json``. The JSON holds the architecture (``meta["arch"]``: registry name and
constructor arguments) so `load_checkpoint` can rebuild the network, plus whatever the
caller adds (normalisation, accuracy, training recipe). When the model was extended by a
training objective (``meta["objective"] = {"name": ..., "params": ...}``), a ``prepare``
step must rebuild the extension before the weights load: `oodscope.train.load_checkpoint`
replays the objective's ``setup``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["load_checkpoint", "load_state_into", "meta_path", "save_checkpoint"]


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def meta_path(path: str | Path) -> Path:
    return _weights_path(path).with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; caches are shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(model, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) and ``meta`` to the ``.json``
    beside it. Adds ``meta["arch"]`` from ``model.oodscope_arch`` when the model was built by
    `oodscope.models.create`. Returns the weights path."""
    from safetensors.torch import save_file

    weights = _weights_path(path)
    meta = dict(meta or {})
    arch = getattr(model, "oodscope_arch", None)
    if arch is not None and "arch" not in meta:
        meta["arch"] = arch
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta["format"] = "oodscope.checkpoint/1"
    text = json.dumps(_jsonable(meta), indent=2, sort_keys=True)
    _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "oodscope.checkpoint/1"}))
    _atomic_write(meta_path(weights), lambda tmp: Path(tmp).write_text(text))
    return weights


def load_state_into(model, state: dict, source: str = "checkpoint") -> None:
    """Load ``state`` strictly into ``model``; a mismatch raises ``ValueError`` naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing[:20]}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:20]}")
        if shapes:
            parts.append(f"shape mismatch: {shapes[:20]}")
        raise ValueError(f"{source} does not match the architecture ({type(model).__name__}); "
                         + "; ".join(parts) + ".")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, model=None, map_location: str = "cpu",
                    prepare: Callable[[Any, dict], None] | None = None):
    """Return ``(model, meta)`` from a checkpoint written by `save_checkpoint`.

    ``model``: load into this module instead of rebuilding it from ``meta["arch"]`` (needed
    for networks that are not in the `oodscope.models` registry). ``prepare(model, meta)``
    runs on the rebuilt network before the weights load (a training objective's extension);
    a checkpoint whose ``meta["objective"]`` needs one and gets none is refused with a
    message naming `oodscope.train.load_checkpoint`.
    """
    from safetensors.torch import load_file

    weights = _weights_path(path)
    if not weights.exists():
        raise FileNotFoundError(f"No checkpoint at {weights}.")
    mpath = meta_path(weights)
    meta = json.loads(mpath.read_text()) if mpath.exists() else {}
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as exc:  # safetensors raises SafetensorError, OSError or ValueError
        raise ValueError(f"{weights}: not a readable safetensors file ({exc}).") from exc
    if model is None:
        arch = meta.get("arch")
        if not arch:
            raise ValueError(f"{mpath} has no 'arch' entry, so the network cannot be rebuilt; "
                             "pass model= with an instance of the right architecture.")
        from . import create

        model = create(arch["name"], **arch.get("kwargs", {}))
        if prepare is not None:
            prepare(model, meta)
    try:
        load_state_into(model, state, str(weights))
    except ValueError:
        objective = (meta.get("objective") or {}).get("name")
        if objective and prepare is None:
            raise ValueError(f"{weights} was trained with the objective {objective!r}, which changes the "
                             "network; load it with oodscope.train.load_checkpoint.") from None
        raise
    model.eval()
    return model, meta
