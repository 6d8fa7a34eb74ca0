"""Noise sets and corruptions."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope import data


def test_noise_sets_are_deterministic_uint8():
    a = data.gaussian_noise(20, (28, 28), seed=1)
    b = data.gaussian_noise(20, (28, 28), seed=1)
    c = data.gaussian_noise(20, (28, 28), seed=2)
    assert a.images.dtype == np.uint8 and a.images.shape == (20, 28, 28) and a.labels is None
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    u = data.uniform_noise(5, (32, 32, 3), seed=0)
    assert u.images.shape == (5, 32, 32, 3) and u.images.min() < 20 and u.images.max() > 235
    assert data.load("uniform-noise", n=3, shape=(8, 8)).images.shape == (3, 8, 8)
    with pytest.raises(ValueError):
        data.gaussian_noise(0)


@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(0)
    # smooth blobs with a dark background, like 28x28 clothing items
    yy, xx = np.mgrid[:28, :28]
    imgs = []
    for _ in range(64):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 9)
        img = 220 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2) + rng.integers(0, 20, (28, 28))
        imgs.append(img)
    return np.clip(np.array(imgs), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", data.CORRUPTIONS)
def test_corruption_strength_grows_with_severity(clean, kind):
    mse = [float(((data.corrupt(clean, kind, s, seed=0).astype(float) - clean) ** 2).mean()) for s in range(1, 6)]
    assert mse[0] > 0
    assert all(b > a * 0.95 for a, b in zip(mse, mse[1:])), mse   # monotone up to noise
    assert mse[4] > 1.5 * mse[0], mse


def test_corrupt_rgb_and_validation(clean):
    rgb = np.repeat(clean[..., None], 3, axis=3)
    for kind in data.CORRUPTIONS:
        out = data.corrupt(rgb, kind, 3)
        assert out.shape == rgb.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="severity"):
        data.corrupt(clean, "blur", 6)
    with pytest.raises(ValueError, match="Unknown corruption"):
        data.corrupt(clean, "snow", 1)
    np.testing.assert_array_equal(data.corrupt(clean, "gaussian_noise", 2, seed=5),
                                  data.corrupt(clean, "gaussian_noise", 2, seed=5))


@pytest.mark.requires_data("fashion-mnist:test")
def test_fashion_mnist_c():
    clean = data.load("fashion-mnist", "test")
    ds = data.load("fashion-mnist-c", kind="contrast", severity=4)
    assert ds.name == "fashion-mnist-c/contrast/4" and len(ds) == len(clean)
    np.testing.assert_array_equal(ds.labels, clean.labels)
    same = data.load("fashion-mnist-c:contrast:4")
    np.testing.assert_array_equal(same.images, ds.images)
    mixed = data.corrupted_dataset(clean.head(len(data.CORRUPTIONS) * 2), None, 2)
    assert mixed.meta["corruption"] == "mixed" and len(mixed) == 2 * len(data.CORRUPTIONS)
