"""Auxiliary outlier sources: shapes, determinism, bad input, and no leak into test OOD sets."""

from __future__ import annotations

import numpy as np
import pytest

from oodscope.data.dataset import ImageDataset
from oodscope.train.objectives import MixOE, OutlierExposure
from oodscope.train.outliers import (check_no_leak, check_outliers_for, conform_images, get_outlier_source,
                                     patch_shuffle)

# sources that need nothing but the ID images, i.e. what a user gets by default
SAFE_SOURCES = ("photos", "noise", "patch-shuffle")


def _id_data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return ImageDataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 3,
                        ["a", "b", "c"], name="toy/train")


def test_photos_are_real_crops_shaped_like_the_id_images():
    src = get_outlier_source("photos", image_shape=(28, 28), n=40, seed=1)
    assert src.images.shape == (40, 28, 28) and src.images.dtype == np.uint8
    assert np.all(src.labels == -1)
    assert {"sklearn:china", "sklearn:flower"} <= set(src.meta["provenance"])
    assert src.images.std() > 10  # photographs, not a constant
    again = get_outlier_source("photos", image_shape=(28, 28), n=40, seed=1)
    assert np.array_equal(src.images, again.images)
    other = get_outlier_source("photos", image_shape=(28, 28), n=40, seed=2)
    assert not np.array_equal(src.images, other.images)
    rgb = get_outlier_source("photos", image_shape=(3, 32, 32), n=5)
    assert rgb.images.shape == (5, 32, 32, 3)


def test_shape_comes_from_id_data_and_is_required():
    src = get_outlier_source("noise", id_data=_id_data(), n=12)
    assert src.images.shape == (12, 28, 28)
    assert src.meta["provenance"] == []
    with pytest.raises(ValueError, match="image_shape"):
        get_outlier_source("noise", n=3)
    with pytest.raises(ValueError, match="image_shape"):
        get_outlier_source("noise", image_shape=(4, 28, 28), n=3)


def test_patch_shuffle_permutes_patches_of_id_images():
    ids = _id_data(8)
    out = patch_shuffle(ids.images, grid=4, seed=0)
    for a, b in zip(ids.images, out):
        pa = sorted(a[r:r + 7, c:c + 7].tobytes() for r in range(0, 28, 7) for c in range(0, 28, 7))
        pb = sorted(b[r:r + 7, c:c + 7].tobytes() for r in range(0, 28, 7) for c in range(0, 28, 7))
        assert pa == pb and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="id_data"):
        get_outlier_source("patch-shuffle", image_shape=(28, 28), n=4)
    src = get_outlier_source("patch-shuffle", id_data=ids, n=5)
    assert len(src) == 5 and src.meta["provenance"] == []


def test_conform_converts_channels_and_resizes():
    rgb = np.zeros((2, 10, 10, 3), np.uint8)
    rgb[..., 0] = 200  # pure red -> luma 0.299 * 200
    grey = conform_images(rgb, (10, 10))
    assert grey.shape == (2, 10, 10) and np.all(grey == round(0.299 * 200))
    back = conform_images(grey, (3, 20, 20))
    assert back.shape == (2, 20, 20, 3) and np.all(back[..., 0] == back[..., 2])
    floats = conform_images(np.full((1, 5, 5), 0.5), (5, 5))
    assert floats.dtype == np.uint8 and floats[0, 0, 0] == 128
    with pytest.raises(ValueError, match="shape"):
        conform_images(np.zeros((2, 5, 10, 10), np.uint8), (28, 28))
    with pytest.raises(ValueError, match="uint8"):
        conform_images(np.full((1, 5, 5), 300.0), (5, 5))


def test_folder_source_reads_and_conforms_images(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = get_outlier_source(f"folder:{tmp_path}", image_shape=(28, 28), n=10)
    assert src.images.shape == (2, 28, 28)
    assert sorted(np.unique(src.images)) == [90, 200]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        get_outlier_source(f"folder:{empty}", image_shape=(28, 28))
    with pytest.raises(ValueError, match="does not exist"):
        get_outlier_source(f"folder:{tmp_path / 'missing'}", image_shape=(28, 28))


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown outlier source"):
        get_outlier_source("imagenet-please", image_shape=(28, 28))
    with pytest.raises(ValueError, match="n must be"):
        get_outlier_source("noise", image_shape=(28, 28), n=0)


def test_objectives_that_need_outliers_refuse_missing_empty_or_misshapen_ones():
    ids = _id_data()
    for obj in (OutlierExposure(), MixOE()):
        with pytest.raises(ValueError, match="needs auxiliary outliers"):
            check_outliers_for(obj, None, ids.image_shape)
        with pytest.raises(ValueError, match="empty"):
            check_outliers_for(obj, ids.subset([]), ids.image_shape)
        wrong = ImageDataset(np.zeros((4, 32, 32, 3), np.uint8), name="rgb")
        with pytest.raises(ValueError, match="image_shape"):
            check_outliers_for(obj, wrong, ids.image_shape)
        check_outliers_for(obj, get_outlier_source("noise", id_data=ids, n=4), ids.image_shape)


def _benchmark_test_ood(name):
    from oodscope.bench import get_benchmark

    names = get_benchmark(name).ood_names
    sources = {n: n for n in names}
    if name.startswith("fashion-mnist-split"):
        from oodscope.bench.classsplit import TEST_OOD_SOURCES

        sources.update(TEST_OOD_SOURCES)  # held-out classes come from fashion-mnist itself
    return sources


@pytest.mark.parametrize("benchmark", ["fashion-mnist", "fashion-mnist-split", "fashion-mnist-split2"])
def test_default_outlier_sources_never_overlap_benchmark_test_ood(benchmark):
    test_ood = _benchmark_test_ood(benchmark)
    assert test_ood, "the benchmark must declare its test OOD sets"
    ids = _id_data()
    for name in SAFE_SOURCES:
        src = get_outlier_source(name, id_data=ids, n=8)
        prov = {p.lower() for p in src.meta["provenance"]}
        assert not prov & {k.lower() for k in test_ood} and not prov & {v.lower() for v in test_ood.values()}
        check_no_leak(src, test_ood)


@pytest.mark.requires_data("mnist:test")
def test_leak_check_refuses_a_test_ood_dataset():
    src = get_outlier_source("dataset:mnist/test", image_shape=(28, 28), n=50)
    assert src.meta["provenance"] == ["mnist"]
    with pytest.raises(ValueError, match="leak"):
        check_no_leak(src, _benchmark_test_ood("fashion-mnist-split"))
    with pytest.raises(ValueError, match="leak"):
        check_no_leak(src, ["MNIST/test"])
    # the class-split's near-OOD set is made of Fashion-MNIST images of held-out classes
    fm = ImageDataset(np.zeros((3, 28, 28), np.uint8), meta={"provenance": ["fashion-mnist"]})
    with pytest.raises(ValueError, match="leak"):
        check_no_leak(fm, _benchmark_test_ood("fashion-mnist-split1"))
