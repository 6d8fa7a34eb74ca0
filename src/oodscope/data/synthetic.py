"""Synthetic OOD sets: noise images, corrupted copies of real images, and outliers generated
from ID images for validation (`generated_outliers`: patch-shuffled and blurred).

The corruptions follow the spirit of Hendrycks & Dietterich (2019, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations", ImageNet-C / CIFAR-10-C):
each kind has five severities, each stronger than the last. The parameters here are
scaled for small (28x28 / 32x32) images; they are not the ImageNet-C constants.
"""

from __future__ import annotations

import io

import numpy as np

from .dataset import ImageDataset

__all__ = ["CORRUPTIONS", "box_blur", "corrupt", "corrupted_dataset", "gaussian_noise", "generated_outliers",
           "patch_shuffle", "uniform_noise"]

#: severity 1..5 parameters per corruption kind
_PARAMS = {
    "gaussian_noise": (0.06, 0.10, 0.15, 0.22, 0.32),   # std in [0, 1] units
    "shot_noise": (60.0, 30.0, 15.0, 8.0, 4.0),          # photons at full intensity
    "impulse_noise": (0.02, 0.05, 0.09, 0.15, 0.25),     # fraction of salt-and-pepper pixels
    "blur": (0.6, 0.9, 1.2, 1.6, 2.2),                   # Gaussian sigma in pixels
    "contrast": (0.65, 0.5, 0.35, 0.22, 0.12),           # contrast factor
    "brightness": (0.1, 0.2, 0.3, 0.45, 0.6),            # added intensity in [0, 1] units
    "rotation": (10.0, 20.0, 30.0, 45.0, 60.0),          # degrees, random sign
    "pixelate": (0.8, 0.65, 0.5, 0.4, 0.3),              # downsampling factor
    "jpeg": (60, 35, 20, 12, 6),                         # JPEG quality
}
CORRUPTIONS = tuple(_PARAMS)


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}.")
    return int(severity)


def _as_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _per_image(images: np.ndarray, fn) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = np.asarray(fn(Image.fromarray(img), i), dtype=np.uint8).reshape(img.shape)
    return out


def corrupt(images: np.ndarray, kind: str, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Return a corrupted copy of uint8 ``images`` ((N, H, W) or (N, H, W, 3)).

    ``kind`` is one of `CORRUPTIONS`; ``severity`` 1 (mild) .. 5 (strong). Deterministic for
    a given ``seed``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"corrupt expects uint8 images (N, H, W[, 3]), got {images.dtype} {images.shape}.")
    if kind not in _PARAMS:
        raise ValueError(f"Unknown corruption {kind!r}; choose one of {CORRUPTIONS}.")
    level = _PARAMS[kind][_check_severity(severity) - 1]
    rng = np.random.default_rng(seed)
    x = images.astype(np.float64)
    spatial = (1, 2)
    if kind == "gaussian_noise":
        return _as_uint8(x + rng.normal(0.0, level * 255.0, x.shape))
    if kind == "shot_noise":
        return _as_uint8(rng.poisson(x / 255.0 * level) / level * 255.0)
    if kind == "impulse_noise":
        u = rng.random(images.shape[:3])
        out = images.copy()
        out[u < level / 2] = 0
        out[(u >= level / 2) & (u < level)] = 255
        return out
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = (0, level, level) + ((0,) if images.ndim == 4 else ())
        return _as_uint8(gaussian_filter(x, sigma=sigma, mode="nearest"))
    if kind == "contrast":
        mean = x.mean(axis=spatial + ((3,) if images.ndim == 4 else ()), keepdims=True)
        return _as_uint8((x - mean) * level + mean)
    if kind == "brightness":
        return _as_uint8(x + level * 255.0)
    if kind == "rotation":
        from scipy.ndimage import rotate

        angles = level * rng.choice([-1.0, 1.0], size=len(images))
        out = np.empty_like(images)
        for i, (img, a) in enumerate(zip(x, angles)):
            out[i] = _as_uint8(rotate(img, a, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0))
        return out
    if kind == "pixelate":
        from PIL import Image

        h, w = images.shape[1:3]
        small = (max(1, round(w * level)), max(1, round(h * level)))
        return _per_image(images, lambda im, i: im.resize(small, Image.BOX).resize((w, h), Image.NEAREST))
    if kind == "jpeg":
        from PIL import Image

        def jpeg(im, i):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(level))
            buf.seek(0)
            return Image.open(buf).convert(im.mode)

        return _per_image(images, jpeg)
    raise AssertionError(kind)  # pragma: no cover


def corrupted_dataset(ds: ImageDataset, kind: str | None = None, severity: int = 3, seed: int = 0,
                      base_name: str | None = None) -> ImageDataset:
    """A corrupted copy of ``ds`` (labels kept: this is covariate shift, not new classes).

    ``kind=None`` mixes the corruptions: image ``i`` gets ``CORRUPTIONS[i % len(CORRUPTIONS)]``.
    """
    _check_severity(severity)
    if kind is None:
        images = ds.images.copy()
        for j, k in enumerate(CORRUPTIONS):
            idx = np.arange(j, len(ds), len(CORRUPTIONS))
            if idx.size:
                images[idx] = corrupt(ds.images[idx], k, severity, seed + j)
        label = "mixed"
    else:
        images = corrupt(ds.images, kind, severity, seed)
        label = kind
    base = base_name or ds.name.split("/")[0]
    return ImageDataset(images, ds.labels, list(ds.classes), name=f"{base}-c/{label}/{severity}",
                        meta={**ds.meta, "corruption": label, "severity": severity, "seed": seed})


def _noise_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape, shape)))
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if not (len(shape) == 2 or (len(shape) == 3 and shape[-1] == 3)) or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) or (H, W, 3) with positive sizes, got {shape}.")
    return shape


def gaussian_noise(n: int = 10000, shape=(28, 28), seed: int = 0, mean: float = 0.5,
                   std: float = 0.25) -> ImageDataset:
    """``n`` images of i.i.d. Gaussian pixels (``mean``/``std`` in [0, 1] units), clipped to 0-255."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    shape = _noise_shape(shape)
    rng = np.random.default_rng(seed)
    images = _as_uint8(rng.normal(mean * 255.0, std * 255.0, (n, *shape)))
    return ImageDataset(images, None, [], name="gaussian-noise", meta={"seed": seed, "mean": mean, "std": std})


def uniform_noise(n: int = 10000, shape=(28, 28), seed: int = 0) -> ImageDataset:
    """``n`` images of i.i.d. uniform pixels in 0-255."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    shape = _noise_shape(shape)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return ImageDataset(images, None, [], name="uniform-noise", meta={"seed": seed})


# --------------------------------------------------------------------------- validation outliers
def patch_shuffle(images: np.ndarray, grid: int = 4, seed: int = 0) -> np.ndarray:
    """Cut each image into ``grid × grid`` patches and permute them (per image)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    ph, pw = h // grid, w // grid
    out = images.copy()
    rng = np.random.default_rng(seed)
    core = images[:, : ph * grid, : pw * grid]
    patches = core.reshape(n, grid, ph, grid, pw, *images.shape[3:]).swapaxes(2, 3)
    patches = patches.reshape(n, grid * grid, ph, pw, *images.shape[3:])
    perm = np.argsort(rng.random((n, grid * grid)), axis=1)
    shuffled = patches[np.arange(n)[:, None], perm]
    shuffled = shuffled.reshape(n, grid, grid, ph, pw, *images.shape[3:]).swapaxes(2, 3)
    out[:, : ph * grid, : pw * grid] = shuffled.reshape(n, ph * grid, pw * grid, *images.shape[3:])
    return out


def box_blur(images: np.ndarray, radius: int = 2, passes: int = 3) -> np.ndarray:
    """Repeated separable box blur (≈ a Gaussian of sigma ``radius·sqrt(passes/3)``)."""
    x = np.asarray(images, dtype=np.float32)
    k = 2 * radius + 1
    for _ in range(passes):
        for axis in (1, 2):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (radius, radius)
            xp = np.pad(x, pad, mode="edge")
            c = np.cumsum(xp, axis=axis, dtype=np.float64)
            zero = np.zeros_like(np.take(c, [0], axis=axis))
            c = np.concatenate([zero, c], axis=axis)
            n = x.shape[axis]
            x = ((np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(0, n), axis=axis)) / k
                 ).astype(np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def generated_outliers(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Validation outliers from ID images: the first half patch-shuffled (4×4 grid), the
    second half heavily blurred (radius ``max(1, height // 14)``, three passes). They keep the
    ID pixel statistics and destroy object shape, and share no image with any test set."""
    images = np.asarray(images)
    half = len(images) // 2
    radius = max(1, images.shape[1] // 14)
    return np.concatenate([patch_shuffle(images[:half], grid=4, seed=seed),
                           box_blur(images[half:], radius=radius, passes=3)])
