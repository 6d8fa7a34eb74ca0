"""OOD generalisation next to OOD detection: in-distribution accuracy under covariate shift.

Two sources of covariate-shifted Fashion-MNIST test images:

* the published **FMNIST-C** (Weiss & Tonella, "Simple Techniques Work Surprisingly Well for
  Neural Network Test Prioritization and Active Learning", ISSTA 2022; github
  testingautomated-usi/fashion-mnist-c): one corrupted copy of each test image (shot and
  impulse noise, glass and motion blur, shear, scale, rotation, brightness, contrast,
  saturation, inversion, flips), each at a random severity. `load_fmnist_c` reads its
  released files (``generated/ubyte/fmnist-c-test-ubyte.gz`` and
  ``fmnist-c-test-labels-ubyte.gz``, IDX; despite the ``.gz`` suffix the released files
  are written uncompressed, so both forms are accepted; or the ``generated/npy`` arrays)
  from a folder ``fmnist-c`` found like every dataset (``OODSCOPE_DATA``, the user cache,
  ``/usr/share/datasets``).
* oodscope's own synthetic corruptions (`oodscope.data.corrupted_dataset`: nine kinds,
  five severities, scaled for 28x28 images). They are *not* FMNIST-C: numbers on them must
  be labelled "synthetic corruptions" (`synthetic_shift_sets` names them so).

For a report beside detection (the intended entry points):

* `covariate_shift_sets` — the shifted copies of an ID test set: the published FMNIST-C
  when it is found, else oodscope's synthetic corruptions (``source=`` forces one);
* `shift_accuracies` — top-1 accuracy per set from cached `Features` (logits + labels),
  so the network runs once per split as for detection; `accuracy_under_shift` runs a
  model on `ImageDataset`s instead;
* `shift_summary` — clean accuracy, mean shifted accuracy and relative robustness
  (shifted / clean); `shift_table` — one row per set (kind, severity, accuracy, accuracy
  relative to clean) as a `pandas.DataFrame`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FMNIST_C_FILES",
    "accuracy_under_shift",
    "covariate_shift_sets",
    "load_fmnist_c",
    "shift_accuracies",
    "shift_summary",
    "shift_table",
    "synthetic_shift_sets",
]

#: released files per split: (images, labels), each as (ubyte name, npy name)
FMNIST_C_FILES = {
    split: ((f"fmnist-c-{split}-ubyte.gz", f"fmnist-c-{split}.npy"),
            (f"fmnist-c-{split}-labels-ubyte.gz", f"fmnist-c-{split}-labels.npy"))
    for split in ("train", "test")
}
_SUBDIRS = ("", "generated/ubyte", "generated/npy", "ubyte", "npy")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


def _read_idx_maybe_gz(path: Path) -> np.ndarray:
    import gzip

    from .data.formats import parse_idx

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # really gzip-compressed
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: truncated or corrupt gzip file ({exc}).") from exc
    return parse_idx(raw, str(path))


def _find(folder: Path, names: tuple[str, str]) -> Path | None:
    for sub in _SUBDIRS:
        for n in names:
            p = folder / sub / n if sub else folder / n
            if p.is_file():
                return p
    return None


def load_fmnist_c(split: str = "test", root: str | os.PathLike | None = None):
    """The published FMNIST-C ``split`` as an `oodscope.data.ImageDataset` (labels kept).

    Raises ``FileNotFoundError`` listing the files it needs when they are absent.
    """
    from .data import ImageDataset
    from .data.registry import find_dataset_dir, search_paths

    if split not in FMNIST_C_FILES:
        raise ValueError(f"FMNIST-C has splits {sorted(FMNIST_C_FILES)}, got {split!r}.")
    img_names, lab_names = FMNIST_C_FILES[split]
    required = [tuple(f"{s}/{n}" if s else n for s in _SUBDIRS for n in names)
                for names in (img_names, lab_names)]
    folder = find_dataset_dir("fmnist-c", required=required, root=root)
    if folder is None:
        where = [str(root)] if root is not None else [str(p) for p in search_paths("fmnist-c")]
        raise FileNotFoundError(
            f"FMNIST-C ({split}) not found. It needs {img_names[0]} and {lab_names[0]} (the "
            f"released IDX files, as in the repository's generated/ubyte/), or {img_names[1]} and "
            f"{lab_names[1]} (generated/npy/), in a folder 'fmnist-c' under one of: {where}. "
            "Get them from github.com/testingautomated-usi/fashion-mnist-c.")
    paths = [_find(folder, img_names), _find(folder, lab_names)]
    arrays = [np.load(p, allow_pickle=False) if p.suffix == ".npy" else _read_idx_maybe_gz(p) for p in paths]
    images, labels = arrays
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}.")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"FMNIST-C {split}: {len(images)} images but {len(labels)} labels.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{paths[1]}: labels outside 0..9 (min {labels.min()}, max {labels.max()}); "
                         "this is not FMNIST-C.")
    return ImageDataset(images, labels.astype(np.int64), list(FASHION_MNIST_CLASSES),
                        name=f"fmnist-c/{split}", meta={"source": [str(p) for p in paths]})


def synthetic_shift_sets(clean, severities: Iterable[int] = (1, 2, 3, 4, 5), kinds: Iterable[str] | None = None,
                         seed: int = 0) -> dict[str, Any]:
    """``{name: ImageDataset}`` of oodscope's synthetic corruptions of ``clean``.

    With ``kinds=None`` every image gets one corruption kind (cycled) per severity
    (``"synthetic-mixed/s3"``); otherwise one set per kind and severity
    (``"synthetic-blur/s3"``).
    """
    from .data import corrupted_dataset

    out = {}
    for s in severities:
        if kinds is None:
            out[f"synthetic-mixed/s{s}"] = corrupted_dataset(clean, None, s, seed)
        else:
            for k in kinds:
                out[f"synthetic-{k}/s{s}"] = corrupted_dataset(clean, k, s, seed)
    return out


def covariate_shift_sets(clean, source: str = "auto", severities: Iterable[int] = (1, 2, 3, 4, 5),
                         seed: int = 0, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Covariate-shifted copies of the Fashion-MNIST test set ``clean``.

    ``source="published"``: ``{"fmnist-c": FMNIST-C test}`` (raises FileNotFoundError listing
    the files when absent); ``"synthetic"``: `synthetic_shift_sets` (mixed kinds, one set per
    severity); ``"auto"``: the published set when found, else the synthetic ones. The set
    names say which it is, so a report cannot label synthetic corruptions as FMNIST-C.
    """
    if source not in ("auto", "published", "synthetic"):
        raise ValueError(f"source must be 'auto', 'published' or 'synthetic', got {source!r}.")
    if source != "synthetic":
        try:
            return {"fmnist-c": load_fmnist_c("test", root)}
        except FileNotFoundError:
            if source == "published":
                raise
    return synthetic_shift_sets(clean, severities, None, seed)


def _top1(f, name: str) -> float:
    from .features import as_features

    f = as_features(f)
    if f.logits is None or f.labels is None:
        raise ValueError(f"shift_accuracies: set {name!r} needs logits and labels (covariate-shift sets keep "
                         "the ID labels).")
    y = np.asarray(f.labels)
    if len(y) == 0:
        raise ValueError(f"shift_accuracies: set {name!r} is empty.")
    logits = np.asarray(f.logits, dtype=np.float64)
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"shift_accuracies: set {name!r} has NaN or inf logits.")
    return float(np.mean(np.argmax(logits, axis=1) == y))


def shift_accuracies(clean, shifted: Mapping[str, Any]) -> dict[str, float]:
    """Top-1 accuracy on ``clean`` (key ``"clean"``) and every shifted set, from `Features`
    holding logits and labels (what a benchmark extracted once)."""
    return {"clean": _top1(clean, "clean"), **{str(k): _top1(v, str(k)) for k, v in shifted.items()}}


def shift_table(accuracies: Mapping[str, float]):
    """One row per set: ``set``, ``kind``, ``severity`` (parsed from names such as
    ``"synthetic-mixed/s3"``; NaN otherwise), ``accuracy`` and ``relative`` (to clean)."""
    import pandas as pd

    summary = shift_summary(accuracies)
    rows = []
    for name, acc in accuracies.items():
        kind, _, sev = str(name).partition("/s")
        rows.append({"set": name, "kind": kind, "severity": int(sev) if sev.isdigit() else None,
                     "accuracy": float(acc), "relative": float(acc) / summary["clean_accuracy"]})
    return pd.DataFrame(rows)


def accuracy_under_shift(model, clean, shifted: Mapping[str, Any], mean=None, std=None, device: str = "cpu",
                         batch_size: int = 512) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on ``clean`` (key ``"clean"``) and on every shifted set.

    Sets are `ImageDataset`s with labels in the same class order; ``mean``/``std`` is the
    model's input normalisation.
    """
    from .data import loader
    from .train.loop import evaluate

    sets = {"clean": clean, **dict(shifted)}
    out = {}
    for name, ds in sets.items():
        if ds.labels is None:
            raise ValueError(f"accuracy_under_shift: set {name!r} has no labels; covariate-shift sets keep "
                             "the ID labels.")
        out[name] = float(evaluate(model, loader(ds, batch_size, mean=mean, std=std), device=device)["accuracy"])
    return out


def shift_summary(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Clean accuracy, mean accuracy over the shifted sets and relative robustness."""
    if "clean" not in accuracies:
        raise ValueError("shift_summary needs the clean accuracy under key 'clean'.")
    shifted = [v for k, v in accuracies.items() if k != "clean"]
    if not shifted:
        raise ValueError("shift_summary needs at least one shifted set.")
    clean = float(accuracies["clean"])
    if not clean > 0:
        raise ValueError(f"clean accuracy is {clean}; relative robustness is undefined for a model "
                         "that classifies nothing correctly.")
    mean = float(np.mean(shifted))
    return {"clean_accuracy": clean, "mean_shift_accuracy": mean, "relative_robustness": mean / clean}
