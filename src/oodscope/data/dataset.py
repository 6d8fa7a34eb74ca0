"""`ImageDataset`: images as a uint8 array plus integer labels and class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ImageDataset", "holdout_split"]


@dataclass
class ImageDataset:
    """A whole image dataset held in memory.

    Attributes
    ----------
    images : uint8 array, ``(N, H, W)`` for grey images or ``(N, H, W, 3)`` for RGB.
    labels : int64 array ``(N,)``, or ``None`` for unlabeled sets (noise, OOD image lists
        without labels). OOD sets often carry ``-1``.
    classes : class names; ``labels`` index into it.
    name : a short identifier such as ``"fashion-mnist/test"``.
    meta : free-form provenance (source files, corruption kind and severity...).
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.dtype != np.uint8:
            raise ValueError(
                f"ImageDataset {self.name!r}: images must be uint8 (0-255), got {images.dtype}; "
                "convert with (x * 255).round().clip(0, 255).astype(np.uint8) for [0, 1] floats.")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"ImageDataset {self.name!r}: images must have shape (N, H, W) or (N, H, W, 3), "
                f"got {images.shape}.")
        self.images = images
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or len(labels) != len(images):
                raise ValueError(
                    f"ImageDataset {self.name!r}: labels must have shape ({len(images)},), got {labels.shape}.")
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"ImageDataset {self.name!r}: labels must be integers, got {labels.dtype}.")
            self.labels = labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        if self.labels is not None and self.labels.size:
            return int(self.labels.max()) + 1
        return 0

    def subset(self, idx, name: str | None = None) -> ImageDataset:
        """A new dataset with the samples at ``idx`` (indices, a slice or a boolean mask)."""
        if isinstance(idx, slice):
            sel = idx
        else:
            sel = np.asarray(idx)
            if sel.dtype == bool:
                if sel.shape != (len(self),):
                    raise ValueError(f"Boolean mask has shape {sel.shape}, expected ({len(self)},).")
            elif sel.size and not np.issubdtype(sel.dtype, np.integer):
                raise ValueError(f"subset needs integer indices or a boolean mask, got {sel.dtype}.")
            else:
                sel = sel.astype(np.int64)
        return ImageDataset(
            images=self.images[sel],
            labels=None if self.labels is None else self.labels[sel],
            classes=list(self.classes),
            name=self.name if name is None else name,
            meta=dict(self.meta),
        )

    def head(self, n: int) -> ImageDataset:
        return self.subset(slice(0, n))

    def sample(self, n: int, seed: int = 0) -> ImageDataset:
        """``n`` samples drawn without replacement (all of them if ``n >= len``)."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self), size=min(n, len(self)), replace=False))
        return self.subset(idx)

    def __repr__(self) -> str:
        lab = "unlabeled" if self.labels is None else f"{self.num_classes} classes"
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, {lab})"


def holdout_split(labels, n_val: int, seed: int = 0):
    """Split positions ``0..len(labels)-1`` into ``(train_idx, val_idx)``, both sorted int64.

    ``val_idx`` holds ``n_val`` positions drawn without replacement, stratified by label:
    each class gets ``n_val * class_count / N`` of them (largest remainders get the leftover
    places, ties to the smaller class id), drawn at random within the class. The same
    ``labels``, ``n_val`` and ``seed`` always give the same split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
    if not isinstance(n_val, (int, np.integer)) or isinstance(n_val, bool) or not 0 < n_val < n:
        raise ValueError(f"n_val must be an integer in [1, {n - 1}] (the number of training images "
                         f"to hold out), got {n_val!r}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_val * counts / n
    take = np.floor(exact).astype(np.int64)
    leftover = int(n_val - take.sum())
    if leftover:
        order = np.lexsort((classes, -(exact - take)))  # largest remainder first
        take[order[:leftover]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    val_idx = np.sort(np.concatenate(picked)).astype(np.int64)
    mask = np.ones(n, bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx
