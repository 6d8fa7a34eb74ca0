"""The `Features` container: what a network produced for a set of inputs.

Running the network is the expensive part of OOD detection, so oodscope runs it once and
keeps everything detectors need in a `Features` object: logits, penultimate features,
labels, the last linear layer (so activation-shaping detectors can recompute logits from
cached features), and optional named extra arrays (other layers, learned temperatures,
raw inputs for the few detectors that must re-run the network, image embeddings, ...).

Per-sample arrays all have the same first dimension N. Model-level arrays (the head) do not.
Persistence is a plain `.npz` file plus a JSON string for metadata; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Features", "FIELDS"]

#: Names a detector may list in ``requires``. Anything else names an entry of ``extras``.
FIELDS = ("logits", "features", "labels", "head", "model")

_PER_SAMPLE = ("logits", "features", "labels")
_SAVED_FIELDS = ("logits", "features", "labels", "head_weight", "head_bias")
_FORMAT_VERSION = 1


def _as_float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"`{name}` must be numeric, got dtype {arr.dtype}.")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    if arr.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {arr.shape}.")
    return arr


@dataclass
class Features:
    """Per-sample network outputs plus the classifier head.

    Parameters
    ----------
    logits : (N, C) array, optional
    features : (N, D) array, optional
        Penultimate-layer activations (input of the last linear layer).
    labels : (N,) integer array, optional
        Class labels in ``[0, C)``; ``-1`` marks an unknown label (e.g. OOD samples).
    head_weight : (C, D) array, optional
        Weight of the last linear layer, ``logits = features @ head_weight.T + head_bias``.
    head_bias : (C,) array, optional
    extras : dict of str -> array, optional
        Extra per-sample arrays with first dimension N (other layers, inputs, ...).
    meta : dict, optional
        JSON-serialisable metadata (model and data fingerprints, class names, ...).
    """

    logits: np.ndarray | None = None
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    head_weight: np.ndarray | None = None
    head_bias: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.logits is not None:
            self.logits = _as_float_array("logits", self.logits, 2)
        if self.features is not None:
            self.features = _as_float_array("features", self.features, 2)
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1:
                raise ValueError(f"`labels` must be 1-D, got shape {labels.shape}.")
            if labels.size and labels.dtype.kind not in "iu":
                if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(
                    labels == np.round(labels)
                ):
                    labels = labels.astype(np.int64)
                else:
                    raise ValueError(
                        f"`labels` must be integers (class indices), got dtype {labels.dtype}."
                    )
            self.labels = labels.astype(np.int64, copy=False)  # keep memmapped labels mapped
        if self.head_weight is not None:
            self.head_weight = _as_float_array("head_weight", self.head_weight, 2)
        if self.head_bias is not None:
            self.head_bias = _as_float_array("head_bias", self.head_bias, 1)
        self.extras = {str(k): np.asarray(v) for k, v in dict(self.extras).items()}
        self.meta = dict(self.meta)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> "Features":
        """Check that shapes agree; raise ``ValueError`` naming the offending field."""
        n = None
        for name, arr in self._per_sample_items():
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(
                    f"All per-sample arrays must have the same length; `{name}` has "
                    f"{arr.shape[0]} rows but an earlier field has {n}."
                )
        if self.logits is not None and self.head_weight is not None:
            if self.head_weight.shape[0] != self.logits.shape[1]:
                raise ValueError(
                    f"head_weight has {self.head_weight.shape[0]} rows but logits have "
                    f"{self.logits.shape[1]} classes."
                )
        if self.features is not None and self.head_weight is not None:
            if self.head_weight.shape[1] != self.features.shape[1]:
                raise ValueError(
                    f"head_weight has {self.head_weight.shape[1]} columns but features are "
                    f"{self.features.shape[1]}-dimensional."
                )
        if self.head_bias is not None:
            if self.head_weight is None:
                raise ValueError("head_bias given without head_weight.")
            if self.head_bias.shape[0] != self.head_weight.shape[0]:
                raise ValueError(
                    f"head_bias has {self.head_bias.shape[0]} entries but head_weight has "
                    f"{self.head_weight.shape[0]} rows."
                )
        return self

    def _per_sample_items(self) -> Iterable[tuple[str, np.ndarray]]:
        for name in _PER_SAMPLE:
            arr = getattr(self, name)
            if arr is not None:
                yield name, arr
        for name, arr in self.extras.items():
            if arr.ndim == 0:
                raise ValueError(f"extra `{name}` must have a first (sample) dimension.")
            yield name, arr

    def has(self, name: str) -> bool:
        """Whether the field ``name`` (a `FIELDS` entry or an extra) is present."""
        if name == "head":
            return self.head_weight is not None
        if name == "model":
            return False  # the model never travels inside Features
        if name in _PER_SAMPLE:
            return getattr(self, name) is not None
        return name in self.extras

    def require(self, names: Iterable[str], who: str = "this detector") -> "Features":
        """Raise a ``ValueError`` listing every missing field in ``names``."""
        missing = sorted(n for n in names if n != "model" and not self.has(n))
        if missing:
            present = sorted(n for n in (*_PER_SAMPLE, "head", *self.extras) if self.has(n))
            raise ValueError(
                f"{who} needs {missing} but the Features only have {present}. "
                "Extract them with oodscope.extract(...) (pass a head or penultimate layer "
                "name if the model has no `forward_features`), or build Features(...) with "
                "those fields."
            )
        return self

    # --------------------------------------------------------------- container
    def __len__(self) -> int:
        for _, arr in self._per_sample_items():
            return int(arr.shape[0])
        return 0

    @property
    def num_classes(self) -> int | None:
        if self.logits is not None:
            return int(self.logits.shape[1])
        if self.head_weight is not None:
            return int(self.head_weight.shape[0])
        n = self.meta.get("num_classes")
        return int(n) if n is not None else None

    def __getitem__(self, index: Any) -> "Features":
        """Select samples with an int, slice, boolean mask or index array."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return Features(
            logits=take(self.logits),
            features=take(self.features),
            labels=take(self.labels),
            head_weight=self.head_weight,
            head_bias=self.head_bias,
            extras={k: v[index] for k, v in self.extras.items()},
            meta=dict(self.meta),
        )

    def replace(self, **changes: Any) -> "Features":
        """A copy with some fields replaced (arrays are shared, not copied)."""
        kwargs = dict(
            logits=self.logits,
            features=self.features,
            labels=self.labels,
            head_weight=self.head_weight,
            head_bias=self.head_bias,
            extras=dict(self.extras),
            meta=dict(self.meta),
        )
        kwargs.update(changes)
        return Features(**kwargs)

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        """Concatenate along samples; all parts must carry the same fields and head."""
        parts = list(parts)
        if not parts:
            raise ValueError("Features.concat needs at least one Features object.")
        first = parts[0]
        for p in parts[1:]:
            if not (_same_array(first.head_weight, p.head_weight) and _same_array(first.head_bias, p.head_bias)):
                raise ValueError("Cannot concatenate Features from different classifier heads.")
            if set(p.extras) != set(first.extras):
                raise ValueError(
                    f"Cannot concatenate Features with different extras: "
                    f"{sorted(first.extras)} vs {sorted(p.extras)}."
                )

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            if all(a is None for a in arrays):
                return None
            if any(a is None for a in arrays):
                raise ValueError(f"Cannot concatenate: `{name}` is missing in some parts.")
            return np.concatenate(arrays, axis=0)

        return Features(
            logits=cat("logits"),
            features=cat("features"),
            labels=cat("labels"),
            head_weight=first.head_weight,
            head_bias=first.head_bias,
            extras={k: np.concatenate([p.extras[k] for p in parts]) for k in first.extras},
            meta=dict(first.meta),
        )

    def logits_from_features(self, features: np.ndarray | None = None) -> np.ndarray:
        """Recompute logits with the cached head: ``features @ W.T + b``."""
        self.require(["head"], "logits_from_features")
        feats = self.features if features is None else features
        if feats is None:
            raise ValueError("No features to apply the head to.")
        out = np.asarray(feats, dtype=np.float32) @ self.head_weight.T
        if self.head_bias is not None:
            out = out + self.head_bias
        return out

    # ------------------------------------------------------------- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name in ("logits", "features", "labels", "head_weight", "head_bias"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        for k, v in self.extras.items():
            if v.dtype == object:
                raise ValueError(f"extra `{k}` has dtype object, which cannot be saved without pickle.")
            arrays[f"extra::{k}"] = v
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: an ``.npz`` file, or a directory of ``.npy`` files + ``meta.json``
        when ``path`` has no ``.npz`` suffix (memory-mappable, for large feature banks).
        Nothing is pickled. ``meta`` must be JSON-able (numpy scalars and small arrays are
        converted to plain numbers and lists)."""
        path = Path(path)
        arrays = self._arrays()
        header = {"format": "oodscope.Features", "version": _FORMAT_VERSION,
                  "meta": _jsonable(self.meta, "meta")}
        text = json.dumps(header)
        if path.suffix != ".npz":
            path.mkdir(parents=True, exist_ok=True)
            # a field saved here earlier but absent now must not come back on load
            keep = {k.replace("::", "__") + ".npy" for k in arrays}
            for old in path.glob("*.npy"):
                if old.name not in keep and (old.stem in _SAVED_FIELDS or old.stem.startswith("extra__")):
                    old.unlink()
            for k, v in arrays.items():
                np.save(path / (k.replace("::", "__") + ".npy"), v, allow_pickle=False)
            (path / "meta.json").write_text(text)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays["__meta__"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> "Features":
        """Read a file written by `save` (``allow_pickle=False``).

        Anything that is not such a file -- damaged, truncated, with unknown members, object
        arrays or unreadable metadata -- is a ``ValueError`` naming the file and the problem.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No Features file at {path}.")
        if path.is_dir():
            header, fields, extras = _read_dir(path, mmap)
        else:
            header, fields, extras = _read_npz(path, mmap)
        try:
            return cls(**fields, extras=extras, meta=header.get("meta", {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: the saved arrays do not form valid Features: {exc}") from None

    def summary(self) -> str:
        parts = [f"n={len(self)}"]
        for name, arr in self._per_sample_items():
            parts.append(f"{name}={tuple(arr.shape)}")
        if self.head_weight is not None:
            parts.append(f"head={tuple(self.head_weight.shape)}")
        return "Features(" + ", ".join(parts) + ")"

    def __repr__(self) -> str:  # dataclass repr would print whole arrays
        return self.summary()


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with numpy scalars/arrays as plain Python; anything else JSON cannot hold
    is a ValueError naming where it sits."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"Features.save: {where} has a non-string key {k!r}; JSON keys are strings.")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.size > 10_000:
            raise ValueError(f"Features.save: {where} is a {value.dtype} array of shape {value.shape}; "
                             "metadata takes small numeric arrays only (store data in extras).")
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"Features.save: {where} has type {type(value).__name__}, which JSON metadata cannot "
                     "hold; use numbers, strings, lists and dicts.")


def _header(raw: bytes, source: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: its metadata is not UTF-8 JSON ({exc}).") from None
    if not isinstance(header, dict) or header.get("format") != "oodscope.Features":
        raise ValueError(f"{source} is not an oodscope Features file (metadata without "
                         "format 'oodscope.Features').")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{source}: metadata `version` must be an integer, got {version!r}.")
    if version > _FORMAT_VERSION:
        raise ValueError(f"{source} was written by a newer oodscope (format {version}; this one "
                         f"reads up to {_FORMAT_VERSION}); upgrade oodscope.")
    if not isinstance(header.get("meta", {}), dict):
        raise ValueError(f"{source}: metadata `meta` must be an object, got "
                         f"{type(header['meta']).__name__}.")
    return header


def _sort_members(names: Iterable[str], source: str) -> tuple[list[str], list[str]]:
    """Split saved member names into fields and extras; an unknown member is an error."""
    fields, extras = [], []
    for name in names:
        if name in _SAVED_FIELDS:
            fields.append(name)
        elif name.startswith(("extra::", "extra__")) and len(name) > 7:
            extras.append(name)
        else:
            raise ValueError(f"{source}: unknown member {name!r} (a Features file holds "
                             f"{', '.join(_SAVED_FIELDS)}, extra::<name> and its metadata).")
    return fields, extras


def _read_member(reader, name: str, source: str) -> np.ndarray:
    try:
        arr = reader(name)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"{source}: member {name!r} is an object array, which is never "
                             "unpickled; re-save it with a numeric dtype.") from None
        raise ValueError(f"{source}: member {name!r} cannot be read ({exc}); the file is damaged "
                         "or truncated.") from None
    except Exception as exc:  # zip CRC / EOF / OS errors of a damaged member
        raise ValueError(f"{source}: member {name!r} cannot be read ({type(exc).__name__}: {exc}); "
                         "the file is damaged or truncated.") from None
    if arr.dtype.hasobject:
        raise ValueError(f"{source}: member {name!r} is an object array, which is never unpickled.")
    return arr


def _read_npz(path: Path, mmap: bool):
    import zipfile

    source = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source} is not a readable Features .npz file (not a zip archive; a plain "
                         ".npy file or a damaged download?).")
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:  # zipfile / format errors
        raise ValueError(f"{source} is not a readable Features .npz file: {exc}") from None
    if not hasattr(data, "files"):
        raise ValueError(f"{source} is not a Features .npz archive.")
    with data:
        if "__meta__" not in data.files:
            raise ValueError(f"{source} was not written by Features.save (no metadata).")
        meta = _read_member(data.__getitem__, "__meta__", source)
        if meta.dtype != np.uint8 or meta.ndim != 1:
            raise ValueError(f"{source}: the metadata member is not a byte string.")
        header = _header(meta.tobytes(), source)
        fields, extras = _sort_members([f for f in data.files if f != "__meta__"], source)
        return (header, {k: _read_member(data.__getitem__, k, source) for k in fields},
                {k[len("extra::"):]: _read_member(data.__getitem__, k, source) for k in extras})


def _read_dir(path: Path, mmap: bool):
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a Features directory (no meta.json).")
    header = _header(meta_file.read_bytes(), str(meta_file))
    others = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    stray = [n for n in others if not n.endswith(".npy")]
    if stray:
        raise ValueError(f"{path}: unexpected file(s) {stray} in a Features directory.")
    fields, extras = _sort_members([n[:-4] for n in others], str(path))

    def read(stem: str) -> np.ndarray:
        return np.load(path / f"{stem}.npy", allow_pickle=False, mmap_mode="r" if mmap else None)

    return (header, {k: _read_member(read, k, str(path / f"{k}.npy")) for k in fields},
            {k[len("extra__"):]: _read_member(read, k, str(path / f"{k}.npy")) for k in extras})


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or np.array_equal(a, b)


def as_features(x: Any) -> Features:
    """Accept a `Features` or a mapping of its fields."""
    if isinstance(x, Features):
        return x
    if isinstance(x, Mapping):
        return Features(**x)
    raise TypeError(
        f"Expected oodscope.Features (or a dict of its fields), got {type(x).__name__}. "
        "Use oodscope.extract(model, data) or Features(logits=..., features=...)."
    )
