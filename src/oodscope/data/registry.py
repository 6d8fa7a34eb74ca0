"""Where datasets live, how to fetch them, and how to check them.

A dataset is looked for, in order, in

1. ``$OODSCOPE_DATA/<name>/`` (``OODSCOPE_DATA`` may list several folders, ``os.pathsep``-separated),
2. the user cache ``~/.cache/oodscope/<name>/`` (``$OODSCOPE_CACHE`` overrides ``~/.cache/oodscope``),
3. system copies ``/usr/share/datasets/<name>/`` (Debian's ``dataset-fashion-mnist``),
4. a download from the canonical URL into the user cache, checked against its published
   checksum (set ``OODSCOPE_OFFLINE=1`` to never touch the network).

Checksums: a file is accepted when the file itself matches a registered SHA-256 (or MD5,
for the sets whose maintainers publish only MD5), or, for ``.gz`` files, when the
decompressed content matches the registered SHA-256 of the raw file -- some mirrors (and
the copies under ``shared/data``) recompress the IDX files, which changes the ``.gz`` bytes
but not the content.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ChecksumError",
    "DatasetSpec",
    "FileSpec",
    "SYSTEM_DATA_DIRS",
    "cache_root",
    "find",
    "find_dataset_dir",
    "get_spec",
    "is_offline",
    "read_verified",
    "register_dataset",
    "registered_names",
    "search_paths",
    "verify_file",
]


class ChecksumError(ValueError):
    """A dataset file does not match its published checksum."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset split.

    ``alternatives`` are other names that hold the same content (the uncompressed IDX
    file, the extracted CIFAR folder); they are checked against ``raw_sha256`` when it is
    known and used as they are otherwise.
    """

    filename: str
    urls: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    md5: tuple[str, ...] = ()
    raw_sha256: str | None = None
    alternatives: tuple[str, ...] = ()

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha256 or self.md5 or self.raw_sha256)


@dataclass
class DatasetSpec:
    name: str
    description: str
    splits: dict[str, tuple[FileSpec, ...]]
    reader: Callable  # reader(spec, directory: Path, split: str, **kw) -> ImageDataset
    classes: list[str] = field(default_factory=list)
    homepage: str = ""
    licence: str = ""
    options: dict = field(default_factory=dict)


_SPECS: dict[str, DatasetSpec] = {}
_VERIFIED: set[tuple[str, int, int]] = set()


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    _SPECS[spec.name] = spec
    return spec


_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100",
            "k-mnist": "kmnist", "not-mnist": "notmnist"}


def canonical_name(name: str) -> str:
    key = name.lower()
    return _ALIASES.get(key, key)


def get_spec(name: str) -> DatasetSpec | None:
    return _SPECS.get(canonical_name(name))


def registered_names() -> list[str]:
    return sorted(_SPECS)


def is_offline() -> bool:
    """``OODSCOPE_OFFLINE`` is set: never touch the network."""
    return os.environ.get("OODSCOPE_OFFLINE", "").lower() in ("1", "true", "yes")


def cache_root() -> Path:
    env = os.environ.get("OODSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodscope"


#: System-wide dataset folders (Debian's ``dataset-*`` packages install here).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)


def search_paths(name: str) -> list[Path]:
    """The folders searched for dataset ``name``, in order."""
    paths = []
    env = os.environ.get("OODSCOPE_DATA")
    if env:
        paths += [Path(p).expanduser() / name for p in env.split(os.pathsep) if p]
    paths.append(cache_root() / name)
    paths += [d / name for d in SYSTEM_DATA_DIRS]
    return paths


def _has(folder: Path, entry: str | tuple[str, ...]) -> bool:
    alternatives = (entry,) if isinstance(entry, str) else entry
    return any((folder / a).exists() for a in alternatives)


def find_dataset_dir(name: str, required=(), root: str | Path | None = None) -> Path | None:
    """The first folder for dataset ``name`` that holds everything in ``required``.

    ``required`` lists paths relative to the folder; an entry may be a tuple of
    alternatives (any one of them will do). With ``root`` only ``root`` itself and
    ``root/name`` are considered (an explicit folder never falls back to other places);
    otherwise the folders of `search_paths` are tried in order. ``None`` when none fits.
    """
    if root is not None:
        root = Path(root).expanduser()
        candidates = [root, root / name]
    else:
        candidates = search_paths(name)
    for folder in candidates:
        if folder.is_dir() and all(_has(folder, r) for r in required):
            return folder
    return None


def locate(directory: Path, fs: FileSpec) -> Path | None:
    for candidate in (fs.filename, *fs.alternatives):
        p = directory / candidate
        if p.exists():
            return p
    return None


def _complete(spec: DatasetSpec, directory: Path, split: str | None) -> bool:
    if not directory.is_dir():
        return False
    splits = [split] if split is not None else list(spec.splits)
    return any(
        s in spec.splits and all(locate(directory, fs) is not None for fs in spec.splits[s])
        for s in splits
    )


def find(name: str, split: str | None = None, download: bool = True) -> Path:
    """Return the folder holding dataset ``name`` (for ``split`` when given).

    Raises ``FileNotFoundError`` listing every folder searched and where to get the files.
    """
    name = canonical_name(name)
    spec = get_spec(name)
    candidates = search_paths(name)
    for d in candidates:
        if spec is None:
            if d.is_dir():
                return d
        elif _complete(spec, d, split):
            return d
    offline = is_offline()
    splits = [split] if split is not None else (list(spec.splits) if spec else [])
    downloadable = spec is not None and splits and all(
        s in spec.splits and all(fs.urls for fs in spec.splits[s]) for s in splits)
    errors = []
    if downloadable and download and not offline:
        target = cache_root() / name
        try:
            for s in splits:
                for fs in spec.splits[s]:
                    if locate(target, fs) is None:
                        _download(fs, target)
            return target
        except OSError as exc:  # URLError, timeouts, disk errors
            errors.append(f"download failed: {exc}")
            try:
                target.rmdir()  # leave no empty folder behind
            except OSError:
                pass
    lines = [f"Dataset {name!r}" + (f" (split {split!r})" if split else "") + " not found. Looked in:"]
    lines += [f"  {d}" + (" (exists, but lacks the files)" if d.exists() else " (does not exist)")
              for d in candidates]
    if spec is not None:
        if split is not None and split not in spec.splits:
            lines.append(f"Unknown split {split!r}; {name} has {sorted(spec.splits)}.")
        for s in splits:
            for fs in spec.splits.get(s, ()):
                where = f" from {fs.urls[0]}" if fs.urls else ""
                lines.append(f"  needs {fs.filename}{where}")
        if spec.homepage:
            lines.append(f"See {spec.homepage}.")
    else:
        lines.append(f"{name!r} is not a registered dataset ({', '.join(registered_names())}); "
                     "put its images in one of the folders above (one subfolder per class).")
    lines += errors
    if offline:
        lines.append("OODSCOPE_OFFLINE is set, so nothing was downloaded.")
    lines.append("Put the files in one of these folders, or point OODSCOPE_DATA at a folder "
                 f"that contains {name}/.")
    raise FileNotFoundError("\n".join(lines))


def _download(fs: FileSpec, target: Path, timeout: float = 60.0) -> Path:
    from tqdm.auto import tqdm

    target.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for url in fs.urls:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{fs.filename}.", suffix=".part")
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "oodscope"})
            with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {fs.filename}",
                          leave=False) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
            final = target / fs.filename
            verify_file(Path(tmp), fs, shown_as=final)
            os.replace(tmp, final)
            return final
        except OSError as exc:
            last = exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"could not download {fs.filename} from {list(fs.urls)}: {last}")


def _hash(data: bytes, algo: str) -> str:
    return hashlib.new(algo, data).hexdigest()


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _check(path: Path, fs: FileSpec, data: bytes, shown_as: Path | None = None) -> bytes:
    """Check ``data`` (the bytes of ``path``) and return the content, decompressed if ``.gz``."""
    shown = shown_as or path
    content = data
    if shown.name.endswith(".gz"):
        try:
            content = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{shown}: truncated or corrupt gzip file ({exc}); delete it and fetch it again.") from exc
    if not fs.has_checksum:
        return content
    is_main = shown.name == fs.filename
    if is_main and (_hash(data, "sha256") in fs.sha256 or (fs.md5 and _hash(data, "md5") in fs.md5)):
        return content
    if fs.raw_sha256 is not None and _hash(content, "sha256") == fs.raw_sha256:
        return content
    if not is_main and fs.raw_sha256 is None:
        return content  # an uncompressed/extracted alternative with no checksum registered
    expected = [f"sha256 {h}" for h in fs.sha256] + [f"md5 {h}" for h in fs.md5]
    if fs.raw_sha256:
        expected.append(f"sha256 {fs.raw_sha256} of the decompressed content")
    raise ChecksumError(
        f"{shown}: checksum mismatch (sha256 {_hash(data, 'sha256')}); expected {' or '.join(expected)}. "
        "The file is corrupt, truncated or a different version: delete it and fetch it again "
        "(or pass verify=False if you trust it).")


def verify_file(path: Path, fs: FileSpec, shown_as: Path | None = None) -> None:
    if path.is_dir():
        return
    _check(path, fs, path.read_bytes(), shown_as)


def read_verified(path: Path, fs: FileSpec | None, verify: bool = True) -> bytes:
    """The content of ``path`` (decompressed if ``.gz``), checked against ``fs`` once per process."""
    path = Path(path)
    data = path.read_bytes()
    if fs is None or not verify:
        if path.name.endswith(".gz"):
            try:
                return gzip.decompress(data)
            except (EOFError, OSError, zlib.error) as exc:
                raise ValueError(f"{path}: truncated or corrupt gzip file ({exc}).") from exc
        return data
    key = _key(path)
    if key in _VERIFIED:
        return _check(path, FileSpec(fs.filename), data)  # decompress only
    content = _check(path, fs, data)
    _VERIFIED.add(key)
    return content


def clear_verification_cache() -> None:
    _VERIFIED.clear()
