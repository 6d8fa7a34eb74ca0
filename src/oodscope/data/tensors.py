"""From `ImageDataset` to torch tensors and loaders (no torchvision needed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .dataset import ImageDataset

__all__ = ["RandomShiftFlip", "channel_stats", "loader", "to_tensor"]


def _as_images(images) -> np.ndarray:
    if isinstance(images, ImageDataset):
        return images.images
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    return arr


def _stat(v, channels: int, what: str):
    import torch

    t = torch.as_tensor(np.asarray(v, dtype=np.float32).reshape(-1))
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} has {t.numel()} values but the images have {channels} channels.")
    return t.view(1, channels, 1, 1)


def to_tensor(images, mean=None, std=None):
    """uint8 ``(N, H, W)`` / ``(N, H, W, C)`` images -> float32 ``(N, C, H, W)`` in [0, 1],
    then ``(x - mean) / std`` when given (scalars or one value per channel).

    Float inputs are taken to be in [0, 1] already.
    """
    import torch

    arr = _as_images(images)
    if arr.ndim not in (3, 4):
        raise ValueError(f"to_tensor expects (N, H, W) or (N, H, W, C) images, got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).clone()
    else:
        raise ValueError(f"to_tensor expects uint8 (0-255) or float ([0, 1]) images, got {arr.dtype}.")
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    c = x.shape[1]
    if mean is not None:
        x.sub_(_stat(mean, c, "mean"))
    if std is not None:
        s = _stat(std, c, "std")
        if (s <= 0).any():
            raise ValueError(f"std must be positive, got {std}.")
        x.div_(s)
    return x


def channel_stats(ds) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images in [0, 1] units (for normalisation)."""
    arr = _as_images(ds)
    x = arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0)
    axes = (0, 1, 2)
    if x.ndim == 3:
        return [float(x.mean())], [float(x.std())]
    return [float(v) for v in x.mean(axis=axes)], [float(v) for v in x.std(axis=axes)]


class _TransformDataset:
    def __init__(self, x, y, transform: Callable):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def loader(ds, batch_size: int = 256, shuffle: bool = False, mean=None, std=None, seed: int = 0,
           transform: Callable | None = None, drop_last: bool = False, num_workers: int = 0):
    """A ``torch.utils.data.DataLoader`` yielding ``(x float32 NCHW, y int64)`` batches.

    ``ds`` is an `ImageDataset`, an image array, or a tuple ``(images, labels)``. Unlabeled
    sets yield ``y = -1``. ``transform`` is applied to each normalised ``(C, H, W)`` tensor.
    Shuffling is reproducible for a given ``seed``.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(ds, tuple) and len(ds) == 2:
        images, labels = ds
    elif isinstance(ds, ImageDataset):
        images, labels = ds.images, ds.labels
    else:
        images, labels = ds, None
    x = to_tensor(images, mean, std)
    if labels is None:
        y = torch.full((len(x),), -1, dtype=torch.int64)
    else:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels.")
    dataset = TensorDataset(x, y) if transform is None else _TransformDataset(x, y, transform)
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, num_workers=num_workers)


class RandomShiftFlip:
    """Batch augmentation: random translation by up to ``shift`` pixels (edge-replicated
    padding) and, with ``flip``, a random horizontal flip. Call as ``aug(x, generator)``
    on an NCHW batch; used by `oodscope.train.fit` through its ``augment`` argument."""

    def __init__(self, shift: int = 2, flip: bool = True):
        self.shift = shift
        self.flip = flip

    def __call__(self, x, generator=None):
        import torch
        import torch.nn.functional as F

        n, _, h, w = x.shape
        if self.flip:
            mask = torch.rand(n, generator=generator) < 0.5
            x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
        if self.shift > 0:
            s = self.shift
            padded = F.pad(x, (s, s, s, s), mode="replicate")
            dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
            cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
            idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, padded.shape[3])
            x = padded.gather(2, idx_r)
            idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
            x = x.gather(3, idx_c)
        return x

    def __repr__(self) -> str:
        return f"RandomShiftFlip(shift={self.shift}, flip={self.flip})"


