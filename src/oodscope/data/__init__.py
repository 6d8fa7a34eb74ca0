"""Image datasets for OOD benchmarks, without torchvision.

>>> from oodscope import data
>>> train = data.load("fashion-mnist", "train")          # ImageDataset, uint8 (60000, 28, 28)
>>> shifted = data.load("fashion-mnist-c", kind="blur", severity=3)
>>> batches = data.loader(train, batch_size=256, mean=0.286, std=0.353)

Names: the registered sets (`list_datasets`), ``"<name>-c"`` (synthetic corruptions of a
registered set's test split; also ``"<name>-c:<kind>:<severity>"``), ``"gaussian-noise"`` and
``"uniform-noise"``, a path to an image folder (one subfolder per class) or to an OpenOOD
image-list file. Files are found as described in `oodscope.data.registry`.
"""

from __future__ import annotations

from pathlib import Path

from . import catalog as _catalog  # noqa: F401  (registers the datasets)
from .dataset import ImageDataset, holdout_split
from .formats import read_image_files, read_image_folder, read_image_list
from .registry import (
    ChecksumError,
    canonical_name,
    find,
    get_spec,
    locate,
    registered_names,
    search_paths,
)
from .synthetic import (CORRUPTIONS, box_blur, corrupt, corrupted_dataset, gaussian_noise, generated_outliers,
                        patch_shuffle, uniform_noise)
from .tensors import RandomShiftFlip, channel_stats, loader, to_tensor

__all__ = [
    "CORRUPTIONS",
    "ChecksumError",
    "ImageDataset",
    "RandomShiftFlip",
    "box_blur",
    "channel_stats",
    "corrupt",
    "corrupted_dataset",
    "describe",
    "find",
    "gaussian_noise",
    "generated_outliers",
    "holdout_split",
    "list_datasets",
    "load",
    "load_image_folder",
    "load_image_list",
    "loader",
    "patch_shuffle",
    "read_image_files",
    "search_paths",
    "to_tensor",
    "uniform_noise",
]

_NOISE = {"gaussian-noise": gaussian_noise, "uniform-noise": uniform_noise}


def list_datasets() -> list[str]:
    """Names `load` understands (any registered ``<name>`` also works as ``<name>-c``)."""
    return sorted(registered_names() + list(_NOISE) + ["fashion-mnist-c", "mnist-c"])


def describe(name: str) -> str:
    spec = get_spec(name)
    if spec is None:
        raise ValueError(f"Unknown dataset {name!r}; known: {list_datasets()}.")
    return f"{spec.name}: {spec.description} [{spec.homepage}]"


def _split_c_name(name: str):
    """``"fashion-mnist-c:blur:3"`` -> ("fashion-mnist", "blur", 3); plain names -> None."""
    parts = name.split(":")
    base = parts[0]
    if not base.endswith("-c") or get_spec(base) is not None or get_spec(base[:-2]) is None:
        return None
    kind = parts[1] if len(parts) > 1 and parts[1] not in ("", "mixed") else None
    severity = int(parts[2]) if len(parts) > 2 else None
    return canonical_name(base[:-2]), kind, severity


def load(name: str, split: str = "test", root: str | Path | None = None, *, verify: bool = True,
         download: bool = True, progress: bool = True, **kwargs) -> ImageDataset:
    """Load dataset ``name``'s ``split`` as an `ImageDataset`.

    Parameters
    ----------
    name : a registered name (see `list_datasets`), ``"<name>-c"``, ``"gaussian-noise"``,
        ``"uniform-noise"``, an image folder or an OpenOOD image-list file (``.txt``).
    split : ``"train"``, ``"test"`` (and ``"extra"`` for SVHN).
    root : folder holding the files (either the files themselves or a ``<name>/`` folder);
        skips the search. For an image-list file, the folder its paths are relative to.
    verify : check files against their published checksums (once per process).
    download : allow fetching from the canonical URL when no local copy exists.
    kwargs : ``kind``/``severity``/``seed`` for corrupted sets; ``n``/``shape``/``seed`` for
        noise; ``size``/``mode``/``skip_broken`` for image folders and lists.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string, got {name!r}.")
    key = canonical_name(name)
    if key in _NOISE:
        return _NOISE[key](**kwargs)
    parsed = _split_c_name(key)
    if parsed is not None:
        base, kind, severity = parsed
        kind = kwargs.pop("kind", kind)
        severity = kwargs.pop("severity", severity if severity is not None else 3)
        seed = kwargs.pop("seed", 0)
        if kwargs:
            raise ValueError(f"Unexpected arguments for {name!r}: {sorted(kwargs)}.")
        clean = load(base, split, root, verify=verify, download=download, progress=progress)
        return corrupted_dataset(clean, kind, severity, seed, base_name=base)

    path = Path(name).expanduser()
    if get_spec(key) is None and path.exists():
        return _load_path(path, split, root, progress, **kwargs)

    spec = get_spec(key)
    if spec is None:
        directory = Path(root) if root is not None else find(key, download=download)
        return _load_path(directory, split, None, progress, **kwargs)
    if split not in spec.splits:
        raise ValueError(f"{spec.name} has no split {split!r}; available: {sorted(spec.splits)}.")
    if root is not None:
        root = Path(root).expanduser()
        directory = root / spec.name if (root / spec.name).is_dir() else root
        missing = [fs.filename for fs in spec.splits[split] if locate(directory, fs) is None]
        if missing:
            raise FileNotFoundError(f"{directory} lacks {missing} for {spec.name} split {split!r}.")
    else:
        directory = find(spec.name, split, download=download)
    if kwargs:
        raise ValueError(f"Unexpected arguments for {spec.name}: {sorted(kwargs)}.")
    key = (spec.name, split, verify, _signature(spec, Path(directory), split))
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = spec.reader(spec, directory, split, verify=verify, progress=progress)
    ds = _CACHE[key]
    # a copy, so callers may modify what they get without touching the cache
    return ImageDataset(ds.images.copy(), None if ds.labels is None else ds.labels.copy(), list(ds.classes),
                        name=ds.name, meta=dict(ds.meta))


#: recently loaded registered datasets, so repeated loads in one process skip decoding
_CACHE: dict[tuple, ImageDataset] = {}
_CACHE_SIZE = 4


def _signature(spec, directory: Path, split: str) -> tuple:
    sig = []
    for fs in spec.splits[split]:
        p = locate(directory, fs)
        st = p.stat() if p is not None else None
        sig.append((str(p.resolve()) if p else None, st.st_size if st else 0, st.st_mtime_ns if st else 0))
    return tuple(sig)


def clear_cache() -> None:
    """Forget datasets loaded earlier in this process."""
    _CACHE.clear()


def _load_path(path: Path, split: str, root, progress: bool, **kwargs) -> ImageDataset:
    if path.is_file():
        images, labels = read_image_list(path, root, progress=progress, **kwargs)
        classes = [] if labels is None else [str(i) for i in range(int(labels.max()) + 1)] if labels.min() >= 0 else []
        return ImageDataset(images, labels, classes, name=path.stem, meta={"source": str(path)})
    folder = path / split if (path / split).is_dir() else path
    images, labels, classes = read_image_folder(folder, progress=progress, **kwargs)
    return ImageDataset(images, labels, classes, name=f"{path.name}/{split}" if folder != path else path.name,
                        meta={"source": str(folder)})


def load_image_folder(path, **kwargs) -> ImageDataset:
    """An image folder (one subfolder per class) as an `ImageDataset`."""
    images, labels, classes = read_image_folder(path, **kwargs)
    return ImageDataset(images, labels, classes, name=Path(path).name, meta={"source": str(path)})


def load_image_list(list_file, root=None, **kwargs) -> ImageDataset:
    """An OpenOOD image-list file (``path label`` per line) as an `ImageDataset`."""
    return _load_path(Path(list_file), "test", root, kwargs.pop("progress", True), **kwargs)
