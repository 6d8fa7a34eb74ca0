"""Readers for the on-disk formats image datasets ship in.

* IDX (MNIST family), ``.gz`` or raw;
* the CIFAR-10/100 "python version" batches, extracted or inside the ``.tar.gz``;
* SVHN's MATLAB files (``scipy.io.loadmat``);
* image folders (one subfolder per class) and OpenOOD image-list files.

Every reader raises ``ValueError`` naming the file when it is truncated or malformed.

A note on CIFAR: its python batches are pickles, the dataset's own format. They are read
with a restricted unpickler that resolves only the few numpy names an array needs
(``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct``); any other
global (the way a malicious pickle runs code) is refused.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_cifar",
    "read_cifar_batch",
    "read_idx",
    "read_image_files",
    "read_image_folder",
    "read_image_list",
    "read_svhn_mat",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: str | Path) -> bytes:
    """The file's content, decompressed when it ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: truncated or corrupt gzip file ({exc}); delete it and fetch it again.") from exc
    return path.read_bytes()


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (LeCun's format: magic ``00 00 <type> <ndim>``, big-endian sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{source}: not an IDX file (bad magic number {data[:4].hex() if data else 'empty'}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{source}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt.")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else arr.copy()


def read_idx(path: str | Path) -> np.ndarray:
    return parse_idx(read_bytes(path), str(path))


# --------------------------------------------------------------------------- CIFAR
class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")


def _unpickle(fh: IO[bytes], source: str) -> dict:
    try:
        obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{source}: refused to read ({exc}); this is not a genuine CIFAR batch.") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"{source}: truncated or corrupt CIFAR batch ({exc}).") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict in the CIFAR batch, got {type(obj).__name__}.")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(fh_or_path, source: str | None = None, label_key: str | None = None):
    """Read one CIFAR python batch: ``(images (N, 32, 32, 3) uint8, labels (N,) int64)``."""
    if isinstance(fh_or_path, (str, Path)):
        source = source or str(fh_or_path)
        with open(fh_or_path, "rb") as fh:
            d = _unpickle(fh, source)
    else:
        d = _unpickle(fh_or_path, source or "<stream>")
    if "data" not in d:
        raise ValueError(f"{source}: CIFAR batch without a 'data' entry (keys: {sorted(d)}).")
    keys = [label_key] if label_key else ["labels", "fine_labels"]
    key = next((k for k in keys if k in d), None)
    if key is None:
        raise ValueError(f"{source}: CIFAR batch without labels (looked for {keys}; keys: {sorted(d)}).")
    data = np.asarray(d["data"])
    labels = np.asarray(d[key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{source}: CIFAR batch has data {data.shape} {data.dtype} and {len(labels)} labels; "
            "expected (N, 3072) uint8 and N labels.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar_meta(fh_or_path, source: str = "<meta>") -> list[str]:
    if isinstance(fh_or_path, (str, Path)):
        with open(fh_or_path, "rb") as fh:
            d = _unpickle(fh, str(fh_or_path))
    else:
        d = _unpickle(fh_or_path, source)
    names = d.get("label_names", d.get("fine_label_names"))
    if names is None:
        return []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(location: str | Path, files: list[str], meta_file: str | None,
               label_key: str | None = None):
    """Read the named batches from a folder or from the ``.tar.gz`` archive.

    Returns ``(images, labels, class_names)``.
    """
    location = Path(location)
    images, labels, classes = [], [], []
    if location.is_file():
        try:
            with tarfile.open(location, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for name in files:
                    if name not in members:
                        raise ValueError(f"{location}: archive has no member {name!r}.")
                    x, y = read_cifar_batch(tar.extractfile(members[name]), f"{location}:{name}", label_key)
                    images.append(x)
                    labels.append(y)
                if meta_file and meta_file in members:
                    classes = read_cifar_meta(tar.extractfile(members[meta_file]), f"{location}:{meta_file}")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{location}: truncated or corrupt archive ({exc}).") from exc
    else:
        for name in files:
            path = location / name
            if not path.exists():
                raise FileNotFoundError(f"CIFAR batch {path} is missing.")
            x, y = read_cifar_batch(path, str(path), label_key)
            images.append(x)
            labels.append(y)
        if meta_file and (location / meta_file).exists():
            classes = read_cifar_meta(location / meta_file)
    return np.concatenate(images), np.concatenate(labels), classes


# --------------------------------------------------------------------------- SVHN
def read_svhn_mat(path: str | Path):
    """SVHN cropped digits: ``X`` is (32, 32, 3, N), ``y`` (N, 1) with 10 meaning digit 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for truncated files
        raise ValueError(f"{path}: cannot read the MATLAB file ({type(exc).__name__}: {exc}); "
                         "it is truncated or corrupt.") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if not k.startswith('__'))}.")
    X = np.asarray(mat["X"])
    y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if X.ndim != 4 or X.shape[2] != 3 or X.shape[3] != len(y):
        raise ValueError(f"{path}: 'X' has shape {X.shape}; expected (32, 32, 3, N) with N={len(y)}.")
    y[y == 10] = 0
    return np.ascontiguousarray(X.transpose(3, 0, 1, 2)).astype(np.uint8, copy=False), y


# --------------------------------------------------------------------------- images
def _load_images(paths: list[Path], size: tuple[int, int] | None, mode: str | None,
                 skip_broken: bool, progress: bool):
    from PIL import Image
    from tqdm.auto import tqdm

    arrays, kept = [], []
    for p in tqdm(paths, desc="read images", unit="img", disable=not progress or len(paths) < 2000,
                  leave=False):
        try:
            with Image.open(p) as im:
                im.load()
                arrays.append(im.copy())
                kept.append(p)
        except Exception as exc:
            if skip_broken:
                continue
            raise ValueError(f"{p}: cannot read the image ({exc}); pass skip_broken=True to skip such files.") from exc
    if not arrays:
        raise ValueError("No readable images found.")
    if mode is None:
        mode = "L" if all(im.mode in ("L", "1", "I;16", "I", "LA") for im in arrays) else "RGB"
    out = []
    for im in arrays:
        im = im.convert(mode)
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        out.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"Images have different sizes {sorted(shapes)[:5]}; pass size=(H, W) to resize them.")
    return np.stack(out), kept


def read_image_files(files, size: tuple[int, int] | None = None, mode: str | None = None,
                     progress: bool = True) -> np.ndarray:
    """The images at ``files`` (paths, or open binary files such as ``io.BytesIO``) in the given
    order, as one uint8 array (resized to ``size`` = (H, W) when given). A missing path is a
    ``FileNotFoundError`` that names how many are missing and the first few."""
    files = list(files)
    missing = [str(f) for f in files if isinstance(f, (str, Path)) and not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} image files are missing, e.g.\n  "
                                + "\n  ".join(missing[:5]))
    images, _ = _load_images(files, size, mode, skip_broken=False, progress=progress)
    return images


def read_image_folder(root: str | Path, size: tuple[int, int] | None = None, mode: str | None = None,
                      skip_broken: bool = False, progress: bool = True):
    """One subfolder per class (sorted names give label order); images directly in ``root``
    form an unlabeled set. Returns ``(images, labels_or_None, classes)``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{root}: no images found (extensions {IMAGE_EXTENSIONS}).")
        images, _ = _load_images(files, size, mode, skip_broken, progress)
        return images, None, []
    images, kept = _load_images(paths, size, mode, skip_broken, progress)
    if len(kept) != len(paths):
        label_of = dict(zip(paths, labels))
        labels = [label_of[p] for p in kept]
    return images, np.asarray(labels, dtype=np.int64), classes


def read_image_list(list_file: str | Path, root: str | Path | None = None,
                    size: tuple[int, int] | None = None, mode: str | None = None,
                    skip_broken: bool = False, progress: bool = True):
    """OpenOOD image-list file (``benchmark_imglist/<benchmark>/<split>_<set>.txt``): one
    ``relative/path extra`` per line, split at the first space as OpenOOD does, where
    ``extra`` is an integer label (``-1`` for OOD sets) or a Python dict literal with a
    ``"label"`` key; a line with a path only is unlabeled. Paths are relative to ``root``
    (OpenOOD's ``data_dir``, e.g. ``images_classic/``; default: the list file's folder).
    Returns ``(images, labels_or_None)``."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    paths, labels = [], []
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, extra = line.partition(" ")
        if name.startswith("/"):
            raise ValueError(f"{list_file}:{lineno}: absolute path {name!r}; OpenOOD lists hold paths "
                             "relative to the data folder.")
        paths.append(root / name)
        labels.append(_list_label(extra.strip(), f"{list_file}:{lineno}") if extra.strip() else None)
    if not paths:
        raise ValueError(f"{list_file}: no entries.")
    if any(l is None for l in labels) and any(l is not None for l in labels):
        raise ValueError(f"{list_file}: some lines have a label and some do not.")
    missing = [p for p in paths if not p.exists()]
    if missing and not skip_broken:
        raise FileNotFoundError(
            f"{list_file}: {len(missing)} listed images are missing under {root}, e.g. {missing[0]}; "
            "pass root= the folder the paths are relative to.")
    has_labels = labels[0] is not None
    images, kept = _load_images([p for p in paths if p.exists()], size, mode, skip_broken, progress)
    if not has_labels:
        return images, None
    label_of = dict(zip(paths, labels))
    return images, np.asarray([label_of[p] for p in kept], dtype=np.int64)


def _list_label(extra: str, where: str) -> int:
    """The label in an OpenOOD list line's extra field: an integer or ``{'label': int, ...}``."""
    if _is_int(extra):
        return int(extra)
    import ast

    try:
        value = ast.literal_eval(extra)
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{where}: cannot read the label field {extra[:60]!r} "
                         "(expected an integer or a dict literal with a 'label' key).") from exc
    if not isinstance(value, dict) or not isinstance(value.get("label"), int):
        raise ValueError(f"{where}: the extra field {extra[:60]!r} has no integer 'label'.")
    return value["label"]


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
