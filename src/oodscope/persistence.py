"""Save and load fitted detectors (and guards) without pickle.

A saved object is a directory:

* ``oodscope.json`` — what it is (``kind``: ``"detector"`` or ``"guard"``), the format
  version, the oodscope version that wrote it, the detector's name, hyperparameters and
  fitted state as JSON, the fields and feature widths it expects;
* ``arrays.safetensors`` — every array of the state, referenced from the JSON by key;
* ``manifest.json`` — the SHA-256 and size of both files, checked before anything is read.

Values in the JSON are plain JSON where they can be, else a one-key tagged object
(``{"$array": key}``, ``{"$tuple": [...]}``, ``{"$detector": {...}}``, ...). Objects are
rebuilt only from registered oodscope classes (`oodscope._state.persistable`), never by
importing a name found in a file, and nothing is unpickled. A hyperparameter that cannot be
written (a torch model, a loaded encoder) is recorded as a *runtime* parameter: pass it to
`load` (``load(path, model=net)``); a detector that needs it to score refuses to load
without it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._cache import file_sha256
from ._state import persistable_class, persistable_name
from .detectors.base import Detector, get_detector_class

__all__ = ["Encoder", "Decoder", "FORMAT_VERSION", "save_detector", "load_detector", "read_saved", "read_bundle",
           "write_bundle", "encode_detector", "decode_detector"]

FORMAT_VERSION = 1
DOCUMENT = "oodscope.json"
ARRAYS = "arrays.safetensors"
MANIFEST = "manifest.json"
_MAX_DEPTH = 64


def _version() -> str:
    from ._version import __version__

    return __version__


# --------------------------------------------------------------------------- encoding
class Encoder:
    """Turns Python values into JSON plus a flat dict of arrays."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.runtime: list[str] = []

    def array(self, arr: np.ndarray, where: str) -> dict[str, Any]:
        arr = np.asarray(arr)
        if arr.dtype.kind in "US":
            return {"$strings": arr.astype(str).reshape(-1).tolist(), "shape": list(arr.shape)}
        if arr.dtype.kind not in "biufc" or arr.dtype.hasobject:
            raise ValueError(
                f"Cannot save {where}: an array of dtype {arr.dtype} (only numeric, bool and "
                "string arrays can be written without pickle)."
            )
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.ascontiguousarray(arr)
        return {"$array": key}

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(f"Cannot save {where}: nesting deeper than {_MAX_DEPTH} levels.")
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_):
            return int(v) if isinstance(v, int) else {"$scalar": int(v), "dtype": str(v.dtype)}
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, np.generic):
            item = v.item()
            if isinstance(item, float) and not math.isfinite(item):
                item = {"$float": repr(item)}
            return {"$scalar": item, "dtype": str(v.dtype)}
        if isinstance(v, np.dtype):
            return {"$dtype": str(v)}
        if isinstance(v, np.ndarray):
            return self.array(v, where)
        if isinstance(v, list):
            return [self.value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tuple": [self.value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, (set, frozenset)):
            tag = "$frozenset" if isinstance(v, frozenset) else "$set"
            return {tag: [self.value(x, f"{where}{{}}", depth + 1) for x in sorted(v, key=repr)]}
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}
            return {"$dict": [[self.value(k, f"{where} key", depth + 1),
                               self.value(x, f"{where}[{k!r}]", depth + 1)] for k, x in v.items()]}
        if isinstance(v, Detector):
            return {"$detector": self.detector(v, where, depth + 1)}
        if _is_tensor(v):
            return {"$tensor": self.array(v.detach().cpu().numpy(), where)}
        cls = persistable_class(persistable_name(type(v)))
        if cls is type(v):
            if hasattr(v, "get_state"):
                state = v.get_state()
            else:
                skip = getattr(type(v), "transient_state", frozenset())
                state = {k: x for k, x in vars(v).items() if k not in skip}
            return {"$object": persistable_name(cls),
                    "state": self.value(dict(state), f"{where}", depth + 1)}
        raise ValueError(
            f"Cannot save {where}: a {type(v).__module__}.{type(v).__qualname__} is neither an "
            "array, a JSON value, a detector nor a registered oodscope object."
        )

    def detector(self, det: Detector, where: str = "detector", depth: int = 0) -> dict[str, Any]:
        params, runtime = {}, []
        for k, v in det.get_params().items():
            try:
                params[k] = self.value(v, f"{where}.params.{k}", depth + 1)
            except ValueError:
                # a model / encoder object: not data, must come back from the caller
                params[k] = None
                runtime.append(k)
        doc: dict[str, Any] = {"name": type(det).name, "params": params, "runtime_params": runtime,
                               "fitted": det.is_fitted}
        if det.is_fitted:
            doc["state"] = self.value(det.get_state(), f"{where}.state", depth + 1)
        self.runtime += [f"{where}.{k}" for k in runtime]
        return doc


def _is_tensor(v: Any) -> bool:
    mod = type(v).__module__
    return mod.startswith("torch") and type(v).__name__ in ("Tensor", "Parameter")


# --------------------------------------------------------------------------- decoding
class Decoder:
    """The inverse of `Encoder`; every malformed piece is a ValueError naming where it is."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str, runtime: dict[str, Any]):
        self.arrays = arrays
        self.source = source
        self.runtime = runtime
        self.used: set[str] = set()

    def check_all_used(self) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise ValueError(f"{self.source}: {ARRAYS} holds arrays {unused[:5]} that nothing "
                             "refers to (an extra member: the file does not match its document).")

    def fail(self, where: str, what: str) -> ValueError:
        return ValueError(f"{self.source}: {where}: {what}")

    def array(self, key: Any, where: str) -> np.ndarray:
        if not isinstance(key, str) or key not in self.arrays:
            raise self.fail(where, f"refers to array {key!r}, which is not in {ARRAYS}")
        self.used.add(key)
        return self.arrays[key]

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail(where, f"nested deeper than {_MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self.value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise self.fail(where, f"unexpected JSON value of type {type(v).__name__}")
        tags = [k for k in v if k.startswith("$")]
        if not tags:
            return {k: self.value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}
        tag = tags[0]
        body = v[tag]
        handler = self._TAGS.get(tag)
        if handler is None or len(tags) != 1:
            raise self.fail(where, f"unknown tag {tag!r}")
        return handler(self, body, v, where, depth)

    def _list(self, body: Any, where: str, depth: int) -> list[Any]:
        if not isinstance(body, list):
            raise self.fail(where, f"expected a list, got {type(body).__name__}")
        return [self.value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(body)]

    def _array_tag(self, body, v, where, depth):
        return self.array(body, where)

    def _tensor_tag(self, body, v, where, depth):
        import torch

        if not isinstance(body, dict) or "$array" not in body:
            raise self.fail(where, "a tensor must hold an array reference")
        return torch.from_numpy(np.array(self.array(body["$array"], where)))

    def _strings_tag(self, body, v, where, depth):
        shape = v.get("shape")
        if not (isinstance(body, list) and all(isinstance(s, str) for s in body)
                and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and math.prod(shape) == len(body)):
            raise self.fail(where, "a string array needs a list of strings and a matching shape")
        return np.array(body, dtype=str).reshape(shape)

    def _scalar_tag(self, body, v, where, depth):
        try:
            dtype = np.dtype(v.get("dtype"))
        except TypeError as exc:
            raise self.fail(where, f"bad scalar dtype {v.get('dtype')!r}") from exc
        if dtype.kind not in "biufc":
            raise self.fail(where, f"bad scalar dtype {dtype}")
        if isinstance(body, dict):
            body = self.value(body, where, depth + 1)
        if not isinstance(body, (bool, int, float)):
            raise self.fail(where, f"scalar value must be a number, got {type(body).__name__}")
        return dtype.type(body)

    def _float_tag(self, body, v, where, depth):
        if body not in ("nan", "inf", "-inf"):
            raise self.fail(where, f"bad non-finite float {body!r}")
        return float(body)

    def _dtype_tag(self, body, v, where, depth):
        try:
            dtype = np.dtype(body)
        except TypeError as exc:
            raise self.fail(where, f"bad dtype {body!r}") from exc
        if dtype.hasobject:
            raise self.fail(where, "object dtype is not allowed")
        return dtype

    def _tuple_tag(self, body, v, where, depth):
        return tuple(self._list(body, where, depth))

    def _set_tag(self, body, v, where, depth):
        return set(self._list(body, where, depth))

    def _frozenset_tag(self, body, v, where, depth):
        return frozenset(self._list(body, where, depth))

    def _dict_tag(self, body, v, where, depth):
        if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise self.fail(where, "a $dict must be a list of [key, value] pairs")
        out = {}
        for k, x in body:
            key = self.value(k, f"{where} key", depth + 1)
            try:
                hash(key)
            except TypeError:
                raise self.fail(where, f"unhashable key {key!r}") from None
            out[key] = self.value(x, f"{where}[{key!r}]", depth + 1)
        return out

    def _detector_tag(self, body, v, where, depth):
        return self.detector(body, where, depth + 1)

    def _object_tag(self, body, v, where, depth):
        cls = persistable_class(body) if isinstance(body, str) else None
        if cls is None:
            raise self.fail(where, f"{body!r} is not a registered oodscope class")
        state = self.value(v.get("state"), f"{where}.state", depth + 1)
        if not isinstance(state, dict):
            raise self.fail(where, "object state must be a dict")
        try:
            if hasattr(cls, "from_state"):
                return cls.from_state(state)
            obj = cls.__new__(cls)
            obj.__dict__.update(state)
            return obj
        except (KeyError, TypeError, ValueError) as exc:
            raise self.fail(where, f"cannot rebuild {cls.__name__}: {exc}") from exc

    _TAGS: dict[str, Callable] = {
        "$array": _array_tag, "$tensor": _tensor_tag, "$strings": _strings_tag,
        "$scalar": _scalar_tag, "$float": _float_tag, "$dtype": _dtype_tag,
        "$tuple": _tuple_tag, "$set": _set_tag, "$frozenset": _frozenset_tag,
        "$dict": _dict_tag, "$detector": _detector_tag, "$object": _object_tag,
    }

    def detector(self, doc: Any, where: str = "detector", depth: int = 0) -> Detector:
        if not isinstance(doc, dict):
            raise self.fail(where, f"expected an object, got {type(doc).__name__}")
        name, params, runtime = doc.get("name"), doc.get("params"), doc.get("runtime_params", [])
        if not isinstance(name, str):
            raise self.fail(where, "`name` must be a detector name (string)")
        if not isinstance(params, dict):
            raise self.fail(where, "`params` must be an object")
        if not (isinstance(runtime, list) and all(isinstance(r, str) for r in runtime)):
            raise self.fail(where, "`runtime_params` must be a list of names")
        try:
            cls = get_detector_class(name)
        except ValueError as exc:
            raise self.fail(where, str(exc)) from None
        kwargs = {k: self.value(x, f"{where}.params.{k}", depth + 1) for k, x in params.items()}
        unknown = sorted(set(kwargs) - set(cls._param_names()))
        if unknown:
            raise self.fail(where, f"{name} has no hyperparameter(s) {unknown}")
        for k in runtime:
            if k in self.runtime:
                kwargs[k] = self.runtime[k]
        det = cls(**kwargs)
        try:
            det._check_params()
        except (ValueError, TypeError) as exc:
            if not runtime:  # with runtime parameters missing, fit-time checks may not hold
                raise self.fail(where, f"invalid hyperparameters: {exc}") from None
        missing = [k for k in runtime if k not in self.runtime and k in _NEEDED_AT_SCORE(cls)]
        if missing:
            raise ValueError(
                f"{self.source}: {name} was saved without its {missing} (objects such as a torch "
                f"model are not written to disk); pass them to load: "
                f"oodscope.load(path, {', '.join(f'{m}=...' for m in missing)})."
            )
        fitted = doc.get("fitted", False)
        if not isinstance(fitted, bool):
            raise self.fail(where, "`fitted` must be true or false")
        if fitted:
            state = self.value(doc.get("state"), f"{where}.state", depth + 1)
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise self.fail(where, "`state` must be an object")
            if state.get("fitted_") is not True:
                raise self.fail(where, "`state.fitted_` must be true for a fitted detector")
            dims = state.get("_fit_dims_", {})
            if not isinstance(dims, dict):
                raise self.fail(where, "`state._fit_dims_` must be an object")
            try:
                det.set_state(state)
            except (ValueError, TypeError, KeyError) as exc:
                raise self.fail(where, f"cannot restore the fitted state: {exc}") from exc
        return det


def _NEEDED_AT_SCORE(cls: type[Detector]) -> set[str]:
    """Runtime parameters a detector cannot score without (the network, for ODIN-like ones)."""
    return {"model"} if "model" in cls.requires else set()


# --------------------------------------------------------------------------- files
def write_bundle(path: str | Path, document: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write ``document`` (JSON) and ``arrays`` (safetensors) to the directory ``path``,
    with a SHA-256 manifest. Files are written next to their final name and renamed, so an
    interrupted save never leaves a half-written bundle that looks complete."""
    from safetensors.numpy import save_file

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another output path.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, DOCUMENT, ARRAYS):  # no old manifest may vouch for new files
        (out / stale).unlink(missing_ok=True)
    doc_bytes = json.dumps(document, indent=1, allow_nan=False).encode("utf-8")
    _atomic_write(out / DOCUMENT, lambda tmp: Path(tmp).write_bytes(doc_bytes))
    _atomic_write(out / ARRAYS, lambda tmp: save_file(arrays, tmp, metadata={"format": "oodscope"}))
    manifest = {
        "format": "oodscope.manifest", "format_version": FORMAT_VERSION,
        "files": {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
                  for name in (DOCUMENT, ARRAYS)},
    }
    _atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return out


def _atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {what} is not valid UTF-8 JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(doc).__name__}.")
    return doc


def read_bundle(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Verify the manifest of the bundle at ``path`` and return ``(document, arrays)``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"No saved oodscope object at {root} (expected a directory with {MANIFEST}).")
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{root}: no {MANIFEST}; this is not a saved oodscope object "
                         "(save one with guard.save(path) or oodscope.save(detector, path)).")
    manifest = _read_json(root / MANIFEST, "the manifest")
    files = manifest.get("files")
    if manifest.get("format") != "oodscope.manifest" or not isinstance(files, dict):
        raise ValueError(f"{root / MANIFEST}: not an oodscope manifest.")
    _check_format_version(manifest.get("format_version"), root / MANIFEST)
    if set(files) != {DOCUMENT, ARRAYS}:
        raise ValueError(f"{root / MANIFEST}: lists {sorted(files)}, expected "
                         f"{sorted([DOCUMENT, ARRAYS])}.")
    extra = sorted(p.name for p in root.iterdir() if p.name not in (MANIFEST, DOCUMENT, ARRAYS)
                   and not p.name.startswith("."))
    if extra:
        raise ValueError(f"{root}: unexpected file(s) {extra}; a saved object holds only "
                         f"{MANIFEST}, {DOCUMENT} and {ARRAYS}.")
    for name, entry in files.items():
        f = root / name
        if not f.is_file():
            raise ValueError(f"{root}: {name} is missing.")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise ValueError(f"{root / MANIFEST}: the entry for {name} needs sha256 and bytes.")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{f}: {size} bytes where the manifest says {entry['bytes']} "
                             "(truncated or modified file); the saved object is damaged.")
        if file_sha256(f) != entry["sha256"]:
            raise ValueError(f"{f}: SHA-256 differs from the manifest (the file was modified "
                             "or corrupted); refusing to load it.")
    document = _read_json(root / DOCUMENT, "the document")
    try:
        arrays = load_file(str(root / ARRAYS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{root / ARRAYS}: not a readable safetensors file ({exc}).") from None
    return document, arrays


def _check_format_version(v: Any, where: Path) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{where}: format_version must be an integer, got {v!r}.")
    if v > FORMAT_VERSION:
        raise ValueError(f"{where}: written in format version {v}, newer than this oodscope "
                         f"({_version()}) reads ({FORMAT_VERSION}); upgrade oodscope.")


def expected_inputs(det: Detector) -> dict[str, Any]:
    """The fields a fitted detector scores from and the widths it was fitted on."""
    dims = getattr(det, "_fit_dims_", {}) if det.is_fitted else {}
    widths = {k: (list(v) if isinstance(v, tuple) else int(v)) for k, v in dims.items()
              if k in det.requires}
    return {"fields": sorted(f for f in det.requires if f != "model"), "widths": widths}


def document_for(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"format": "oodscope", "kind": kind, "format_version": FORMAT_VERSION,
            "oodscope_version": _version(), **body}


def encode_detector(det: Detector) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """``(json, arrays, runtime_parameter_paths)`` of a detector."""
    enc = Encoder()
    doc = enc.detector(det)
    return doc, enc.arrays, enc.runtime


def decode_detector(doc: Any, arrays: dict[str, np.ndarray], source: str,
                    runtime: dict[str, Any] | None = None) -> Detector:
    dec = Decoder(arrays, source, dict(runtime or {}))
    det = dec.detector(doc)
    dec.check_all_used()
    return det


def check_document(doc: dict[str, Any], source: str, kind: str | None = None) -> str:
    if doc.get("format") != "oodscope":
        raise ValueError(f"{source}: not an oodscope document (format {doc.get('format')!r}).")
    _check_format_version(doc.get("format_version"), Path(source))
    found = doc.get("kind")
    if found not in ("detector", "guard") or (kind is not None and found != kind):
        raise ValueError(f"{source}: holds a {found!r}, expected {kind or 'detector or guard'}.")
    return found


# --------------------------------------------------------------------------- public API
def save_detector(detector: Detector, path: str | Path) -> Path:
    """Save a (fitted) detector to the directory ``path``: arrays + JSON, never pickle."""
    if not isinstance(detector, Detector):
        raise TypeError(f"save_detector() takes a Detector, got {type(detector).__name__}.")
    doc, arrays, runtime = encode_detector(detector)
    body = {"detector": doc, "expects": expected_inputs(detector), "runtime_params": runtime}
    return write_bundle(path, document_for("detector", body), arrays)


def read_saved(path: str | Path) -> tuple[str, dict[str, Any], dict[str, np.ndarray], str]:
    """``(kind, document, arrays, source)`` of a saved object, its manifest checked."""
    document, arrays = read_bundle(path)
    source = str(Path(path) / DOCUMENT)
    return check_document(document, source), document, arrays, source


def load_detector(path: str | Path, **runtime: Any) -> Detector:
    """Load what `save_detector` wrote. The manifest is checked first: a modified,
    truncated or extra file is refused with a ``ValueError``. Objects that were not written
    (e.g. ``model=`` for ODIN) are passed as keyword arguments."""
    kind, document, arrays, source = read_saved(path)
    if kind != "detector":
        raise ValueError(f"{source} holds a {kind}; load it with oodscope.load.")
    return detector_from_document(document, arrays, source, runtime)


def detector_from_document(document: dict[str, Any], arrays: dict[str, np.ndarray], source: str,
                           runtime: dict[str, Any]) -> Detector:
    det = decode_detector(document.get("detector"), arrays, source, runtime)
    expects = document.get("expects")
    if expects is not None and expects != expected_inputs(det):
        raise ValueError(f"{source}: `expects` {expects} does not match the detector's fitted "
                         f"state {expected_inputs(det)}; the file was edited inconsistently.")
    return det
