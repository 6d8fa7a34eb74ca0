"""Auxiliary outlier sources for Outlier Exposure-style training, without leaking test OOD.

An outlier source is an `oodscope.data.ImageDataset` (uint8 images, labels ``-1``) shaped
like the in-distribution images, with ``meta["provenance"]``: the external datasets it draws
from (empty for generated images). `check_no_leak` refuses a source that draws from a set a
benchmark tests on.

Sources (``get_outlier_source(name, ...)``):

* ``"photos"``: random crops of the natural photographs shipped with scikit-learn
  (`sklearn.datasets.load_sample_images`: a Chinese temple and a flower) and, when
  scikit-image is installed, its `skimage.data` photographs; resized to the ID image size
  and converted to grey when the ID images are grey. Offline, real, disjoint from every
  benchmark OOD set.
* ``"noise"``: generated images: uniform, Gaussian and smooth (upsampled) noise.
* ``"patch-shuffle"``: ID images cut into a grid of patches that are shuffled; needs
  ``id_data``. Local statistics of the ID data, broken global shape.
* ``"dataset:<name>[/<split>]"``: any dataset `oodscope.data.load` knows.
* ``"folder:<path>"``: every image file under a folder (png, jpg, bmp, gif, tif, webp).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["get_outlier_source", "list_outlier_sources", "conform_images", "check_no_leak",
           "check_outliers_for", "photo_crops", "noise_images", "patch_shuffle"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_outlier_sources() -> list[str]:
    return ["photos", "noise", "patch-shuffle", "dataset:<name>[/<split>]", "folder:<path>"]


def _image_dataset(images: np.ndarray, name: str, provenance: Iterable[str], **meta: Any):
    from ..data.dataset import ImageDataset

    return ImageDataset(images=images, labels=-np.ones(len(images), dtype=np.int64), classes=[],
                        name=f"outliers/{name}",
                        meta={"provenance": sorted(set(provenance)), "outlier_source": name, **meta})


def _target_shape(image_shape: Any) -> tuple[int, int, int]:
    """``(H, W, C)`` from ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C in {1, 3}."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        if shape[-1] in (1, 3):
            return shape[0], shape[1], shape[2]
        if shape[0] in (1, 3):
            return shape[1], shape[2], shape[0]
    raise ValueError(
        f"image_shape must be (H, W) for grey or (H, W, 3) / (3, H, W) for colour images, got {shape}."
    )


def conform_images(images: np.ndarray, image_shape: Any) -> np.ndarray:
    """Resize and convert ``images`` (uint8 ``(N, H, W)`` or ``(N, H, W, 3)``) to ``image_shape``.

    Grey <-> RGB conversion uses ITU-R 601 luma / channel repetition; resizing uses PIL's
    area-averaging (``BOX``) filter when shrinking and bilinear when enlarging. Returns the
    ImageDataset layout: ``(N, H, W)`` for grey, ``(N, H, W, 3)`` for RGB.
    """
    from PIL import Image

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255).round().astype(np.uint8)
        else:
            raise ValueError(f"Outlier images must be uint8 (0-255) or floats in [0, 1], got {arr.dtype}.")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (3, 4))):
        raise ValueError(
            f"Outlier images must have shape (N, H, W) or (N, H, W, 3), got {arr.shape}; "
            "channels-first arrays must be transposed to channels-last."
        )
    if arr.ndim == 4 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    h, w, c = _target_shape(image_shape)
    out = np.empty((len(arr), h, w) if c == 1 else (len(arr), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(arr):
        if img.shape[:2] != (h, w):  # resize first: cheaper than converting a large image
            pil = Image.fromarray(img)
            resample = Image.BOX if img.shape[0] >= h and img.shape[1] >= w else Image.BILINEAR
            img = np.asarray(pil.resize((w, h), resample=resample))
        if img.ndim == 2 and c == 3:
            img = np.repeat(img[..., None], 3, axis=2)
        elif img.ndim == 3 and c == 1:
            img = (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114).round().astype(np.uint8)
        out[i] = img
    return out


_PHOTOS: list[tuple[str, np.ndarray]] | None = None


def _sample_photographs() -> list[tuple[str, np.ndarray]]:
    global _PHOTOS
    if _PHOTOS is None:
        _PHOTOS = _read_photographs()
    return _PHOTOS


def _read_photographs() -> list[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = [(f"sklearn:{Path(f).stem}", np.asarray(img)) for f, img in zip(data.filenames, data.images)]
    try:  # optional: scikit-image's photographs
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                     "camera", "coins", "moon", "grass", "gravel", "brick"):
            fn = getattr(skdata, name, None)
            if fn is None:
                continue
            try:
                photos.append((f"skimage:{name}", np.asarray(fn())))
            except Exception:  # some need pooch downloads; skip those offline
                continue
    except ImportError:
        pass
    return photos


def photo_crops(n: int, image_shape: Any, seed: int = 0, min_side: int = 24,
                max_side: int | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` random square crops (side ``min_side``..``max_side`` px, random flips) of the
    shipped photographs, resized to ``image_shape``; also returns the photo names used."""
    rng = np.random.default_rng(seed)
    photos = _sample_photographs()
    crops = []
    h, w, c = _target_shape(image_shape)
    for _ in range(n):
        _, img = photos[int(rng.integers(len(photos)))]
        ph, pw = img.shape[:2]
        hi = min(ph, pw) if max_side is None else min(max_side, ph, pw)
        side = int(rng.integers(min(min_side, hi), hi + 1))
        top, left = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
        crop = img[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        crops.append(conform_images(np.ascontiguousarray(crop)[None], (h, w, c))[0])
    images = np.stack(crops) if crops else np.zeros((0, h, w) if c == 1 else (0, h, w, 3), np.uint8)
    return images, [name for name, _ in photos]


def noise_images(n: int, image_shape: Any, seed: int = 0) -> np.ndarray:
    """A third each of uniform, Gaussian (mean 0.5, sd 0.25, clipped) and smooth noise."""
    rng = np.random.default_rng(seed)
    h, w, c = _target_shape(image_shape)
    shape = (h, w) if c == 1 else (h, w, 3)
    out = np.empty((n, *shape), dtype=np.float64)
    kinds = rng.integers(0, 3, n)
    for i, kind in enumerate(kinds):
        if kind == 0:
            out[i] = rng.random(shape)
        elif kind == 1:
            out[i] = 0.5 + 0.25 * rng.standard_normal(shape)
        else:  # low-resolution noise upsampled: smooth blobs
            g = int(rng.integers(2, 8))
            small = rng.random((g, g) if c == 1 else (g, g, 3))
            ys = (np.arange(h) * g // h)
            xs = (np.arange(w) * g // w)
            out[i] = small[ys][:, xs]
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def patch_shuffle(images: np.ndarray, grid: int = 4, seed: int = 0) -> np.ndarray:
    """Cut each image into a ``grid x grid`` array of patches and shuffle the patches."""
    rng = np.random.default_rng(seed)
    imgs = np.asarray(images)
    n, h, w = imgs.shape[:3]
    if grid < 2 or grid > min(h, w):
        raise ValueError(f"grid must be in [2, {min(h, w)}], got {grid}.")
    ph, pw = h // grid, w // grid
    out = imgs.copy()
    for i in range(n):
        patches = [imgs[i, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw].copy()
                   for r in range(grid) for q in range(grid)]
        perm = rng.permutation(len(patches))
        while len(perm) > 1 and np.all(perm == np.arange(len(perm))):
            perm = rng.permutation(len(patches))
        for slot, j in enumerate(perm):
            r, q = divmod(slot, grid)
            out[i, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw] = patches[j]
    return out


def _load_folder(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_dir():
        raise ValueError(f"Outlier folder {str(path)!r} does not exist or is not a directory.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    return images  # type: ignore[return-value]


def get_outlier_source(name: Any, image_shape: Any = None, n: int = 10000, seed: int = 0,
                       id_data: Any = None, **kwargs: Any):
    """Return an outlier `ImageDataset` shaped ``image_shape`` (taken from ``id_data`` if omitted).

    ``name`` is a source name (see the module docs), or an `ImageDataset` / uint8 array of
    images to use as they are (resized to ``image_shape``). ``n`` caps the number of images
    (generated sources make exactly ``n``). ``kwargs`` go to the generator (e.g. ``grid`` for
    patch-shuffle, ``min_side`` for photos).
    """
    if image_shape is None:
        if id_data is None:
            raise ValueError("get_outlier_source needs image_shape=(H, W) or (H, W, 3), or id_data to copy it from.")
        image_shape = tuple(id_data.images.shape[1:])
    h, w, c = _target_shape(image_shape)
    if n < 1:
        raise ValueError(f"n must be >= 1 outlier image, got {n}.")
    if not isinstance(name, str):
        images = getattr(name, "images", name)
        prov = getattr(name, "meta", {}).get("provenance", [getattr(name, "name", "") or "user-array"])
        src = _image_dataset(conform_images(np.asarray(images)[:n], (h, w, c)), "custom", prov)
        return _nonempty(src)
    key = name.strip()
    low = key.lower()
    if low in ("photos", "sample-photos", "natural-photos"):
        images, used = photo_crops(n, (h, w, c), seed=seed, **kwargs)
        return _nonempty(_image_dataset(images, "photos", used, seed=seed))
    if low in ("noise", "gaussian-noise", "generated-noise"):
        return _nonempty(_image_dataset(noise_images(n, (h, w, c), seed=seed), "noise", []))
    if low in ("patch-shuffle", "patch-shuffled", "shuffle"):
        if id_data is None:
            raise ValueError("The patch-shuffle outlier source needs id_data (the ID training ImageDataset).")
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(id_data), size=min(n, len(id_data)), replace=False)
        base = conform_images(np.asarray(id_data.images)[np.sort(idx)], (h, w, c))
        images = patch_shuffle(base, grid=kwargs.get("grid", 4), seed=seed)
        # derived from ID training data, which is never a test OOD set
        return _nonempty(_image_dataset(images, "patch-shuffle", [], derived_from=getattr(id_data, "name", "")))
    if low.startswith("dataset:"):
        from ..data import load

        spec = key.split(":", 1)[1]
        dname, _, split = spec.partition("/")
        ds = load(dname, split or "train")
        if len(ds) > n:
            ds = ds.sample(n, seed=seed)
        return _nonempty(_image_dataset(conform_images(ds.images, (h, w, c)), f"dataset:{spec}", [dname]))
    if low.startswith("folder:") or Path(key).is_dir():
        path = Path(key.split(":", 1)[1] if low.startswith("folder:") else key).expanduser()
        images = _load_folder(path)
        if not images:
            raise ValueError(f"Outlier folder {str(path)!r} holds no image files ({sorted(_IMAGE_SUFFIXES)}).")
        rng = np.random.default_rng(seed)
        if len(images) > n:
            images = [images[i] for i in np.sort(rng.choice(len(images), n, replace=False))]
        conformed = np.stack([conform_images(img[None], (h, w, c))[0] for img in images])
        return _nonempty(_image_dataset(conformed, f"folder:{path.name}", [f"folder:{path.resolve()}"]))
    raise ValueError(f"Unknown outlier source {name!r}; available: {list_outlier_sources()}.")


def _nonempty(src):
    if len(src) == 0:
        raise ValueError(f"Outlier source {src.name!r} is empty.")
    return src


def _base_name(name: str) -> str:
    """``"MNIST/test"`` -> ``"mnist"``; ``"dataset:kmnist/train"`` -> ``"kmnist"``; folders kept whole."""
    name = str(name).lower().strip()
    if name.startswith("folder:"):
        return name
    if name.startswith("dataset:"):
        name = name[len("dataset:"):]
    return re.split(r"[/\[]", name, maxsplit=1)[0].replace("_", "-").strip()


def check_no_leak(source, test_ood: Iterable[str] | dict[str, str]) -> None:
    """Raise `ValueError` if the outlier ``source`` draws from a dataset a benchmark tests on.

    ``test_ood`` holds the names of the test OOD sets, or maps each set's name to the dataset
    it comes from (``{"held-out": "fashion-mnist", "mnist": "mnist"}``); both the set names
    and the dataset names are compared with ``source.meta["provenance"]`` (case-insensitive,
    split suffixes ignored).
    """
    names = set()
    items = test_ood.items() if isinstance(test_ood, dict) else ((t, t) for t in test_ood)
    for set_name, dataset in items:
        names.add(_base_name(set_name))
        names.add(_base_name(dataset))
    prov = {_base_name(p) for p in getattr(source, "meta", {}).get("provenance", [])}
    leak = sorted(prov & names)
    if leak:
        raise ValueError(
            f"Outlier source {getattr(source, 'name', source)!r} draws from {leak}, which the benchmark "
            "uses as test OOD data: training on it would leak the test set. Use another source, e.g. "
            "'photos', 'noise' or 'patch-shuffle'."
        )


def check_outliers_for(objective, outliers, id_shape: Any = None) -> None:
    """Clear errors before training: missing/empty outliers for an objective that needs them,
    or outlier images whose shape differs from the ID images."""
    if not getattr(objective, "needs_outliers", False):
        return
    name = getattr(objective, "name", type(objective).__name__)
    if outliers is None or len(outliers) == 0:
        raise ValueError(
            f"Training method {name!r} needs auxiliary outliers but got {'none' if outliers is None else 'an empty set'}. "
            "Pass outliers=oodscope.train.outliers.get_outlier_source('photos', id_data=train) "
            "(or `--outliers photos` on the command line)."
        )
    if id_shape is not None and hasattr(outliers, "images"):
        got = tuple(outliers.images.shape[1:])
        want = tuple(id_shape)
        if _target_shape(got) != _target_shape(want):
            raise ValueError(
                f"Outlier images have shape {got}, the ID images {want}: rebuild the source with "
                f"get_outlier_source(..., image_shape={want}) or conform_images(images, {want})."
            )
