"""Dataset loaders: real files under shared/data and tiny generated files for other formats."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from oodscope import data
from oodscope.data.registry import ChecksumError, clear_verification_cache

from oodscope.data import registry

#: where the real data is looked up, fixed when the module is imported (tests change the env)
REAL_DATA = os.environ.get("OODSCOPE_DATA", "")
# where the real files may be besides OODSCOPE_DATA (the `isolated` fixture hides both)
REAL_CACHE = os.environ.get("OODSCOPE_CACHE")
REAL_SYSTEM_DIRS = registry.SYSTEM_DATA_DIRS


def real_dir(name: str, split: str) -> Path:
    """The folder holding the real ``name`` files (for tests that copy and damage them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OODSCOPE_DATA", REAL_DATA)
        if REAL_CACHE is None:
            mp.delenv("OODSCOPE_CACHE", raising=False)
        else:
            mp.setenv("OODSCOPE_CACHE", REAL_CACHE)
        mp.setattr(registry, "SYSTEM_DATA_DIRS", REAL_SYSTEM_DIRS)
        return registry.find(name, split, download=False)


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.tobytes()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """An empty data search path, no cache, no network."""
    monkeypatch.setenv("OODSCOPE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODSCOPE_OFFLINE", "1")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", ())
    (tmp_path / "data").mkdir()
    clear_verification_cache()
    data.clear_cache()
    yield tmp_path / "data"
    data.clear_cache()


# ------------------------------------------------------------------ real files
@pytest.mark.requires_data("fashion-mnist")
def test_fashion_mnist_real_files_load_and_verify():
    ds = data.load("fashion-mnist", "test")
    assert ds.images.shape == (10000, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (10000,) and ds.labels.dtype == np.int64
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    assert ds.images.flags.writeable
    train = data.load("fashion-mnist", "train")
    assert train.images.shape == (60000, 28, 28) and np.bincount(train.labels).tolist() == [6000] * 10


@pytest.mark.requires_data("mnist:test")
def test_mnist_recompressed_gz_accepted_by_content_checksum():
    # the .gz files in shared/data were recompressed: only the raw checksum matches
    ds = data.load("mnist", "test")
    assert len(ds) == 10000 and ds.labels[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.requires_data("fashion-mnist:test")
def test_checksum_mismatch_names_the_file(isolated):
    d = isolated / "fashion-mnist"
    d.mkdir()
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(real_dir("fashion-mnist", "test") / f, d / f)
    raw = bytearray(gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid IDX file
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz.*checksum mismatch"):
        data.load("fashion-mnist", "test")
    ds = data.load("fashion-mnist", "test", verify=False)
    assert len(ds) == 10000


@pytest.mark.requires_data("mnist:test")
def test_truncated_gzip_raises_value_error_naming_file(isolated):
    d = isolated / "mnist"
    d.mkdir()
    src = real_dir("mnist", "test")
    shutil.copy(src / "t10k-labels-idx1-ubyte.gz", d)
    blob = (src / "t10k-images-idx3-ubyte.gz").read_bytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", "test")


def test_truncated_raw_idx_raises(isolated):
    d = isolated / "kmnist"
    d.mkdir()
    imgs = np.zeros((5, 28, 28), np.uint8)
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(imgs)[:-10])
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(5)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        data.load("kmnist", "test")


def test_idx_uncompressed_alternative_and_gz_checksum(isolated):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7) % 10
    d = isolated / "kmnist"
    d.mkdir()
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(imgs))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    ds = data.load("kmnist", "test")  # raw files, no raw checksum registered: accepted
    np.testing.assert_array_equal(ds.images, imgs)
    assert ds.labels.tolist() == labels.tolist() and ds.classes[:2] == ["o", "ki"]
    # a .gz that is not the published file is refused (kmnist has published .gz checksums)
    for f in list(d.iterdir()):
        (d / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(ChecksumError):
        data.load("kmnist", "test")


def test_emnist_images_are_transposed_and_letters_zero_based(isolated):
    imgs = np.zeros((2, 28, 28), np.uint8)
    imgs[:, 0, 5] = 255  # stored transposed: appears at (5, 0) after loading
    d = isolated / "emnist-letters"
    d.mkdir()
    (d / "emnist-letters-test-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    (d / "emnist-letters-test-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([1, 26]))))
    ds = data.load("emnist-letters", "test")
    assert ds.images[0, 5, 0] == 255 and ds.images[0, 0, 5] == 0
    assert ds.labels.tolist() == [0, 25] and ds.classes[25] == "Z"


def test_missing_dataset_lists_every_path_and_url(isolated, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (Path("/usr/share/datasets"),))
    with pytest.raises(FileNotFoundError) as err:
        data.load("svhn", "test")
    msg = str(err.value)
    assert str(isolated / "svhn") in msg
    assert str(tmp_path / "cache" / "svhn") in msg
    assert "/usr/share/datasets/svhn" in msg
    assert "http://ufldl.stanford.edu/housenumbers/test_32x32.mat" in msg
    assert "OODSCOPE_OFFLINE" in msg


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load("fashion-mnist", "validation")


# ------------------------------------------------------------------ CIFAR pickles
def _cifar_batch(n, seed, label_key="labels", n_classes=10):
    """A batch with the keys of the real files (py2 ``str`` keys, read back as bytes)."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): [int(v) for v in rng.integers(0, n_classes, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _dump_like_cifar(obj, path: Path):
    """Protocol 2 with the ``numpy.core`` names the published (numpy 1.x, Python 2) files use."""
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core."))


def _write_cifar10(folder: Path):
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _dump_like_cifar(_cifar_batch(4, i), folder / f"data_batch_{i}")
    _dump_like_cifar(_cifar_batch(3, 9), folder / "test_batch")
    _dump_like_cifar({b"num_cases_per_batch": 10000, b"label_names": [f"c{i}".encode() for i in range(10)],
                      b"num_vis": 3072}, folder / "batches.meta")


def test_cifar10_extracted_folder_and_archive(isolated):
    _write_cifar10(isolated / "cifar10" / "cifar-10-batches-py")
    train = data.load("cifar10", "train")
    assert train.images.shape == (20, 32, 32, 3) and train.labels.shape == (20,)
    raw = _cifar_batch(4, 1)[b"data"][0]
    np.testing.assert_array_equal(train.images[0, :, :, 0].reshape(-1), raw[:1024])  # red plane first
    assert train.classes == [f"c{i}" for i in range(10)]
    # the same batches read from inside the .tar.gz (checksum off: not the published archive)
    arch = isolated / "arch"
    arch.mkdir()
    with tarfile.open(arch / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(isolated / "cifar10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    test = data.load("cifar10", "test", root=arch, verify=False)
    assert test.images.shape == (3, 32, 32, 3)
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", "test", root=arch)


def test_cifar100_fine_labels(isolated):
    folder = isolated / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        batch = _cifar_batch(n, n, "fine_labels", n_classes=100)
        batch[b"coarse_labels"] = [0] * n
        _dump_like_cifar(batch, folder / split)
    _dump_like_cifar({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                      b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, folder / "meta")
    ds = data.load("cifar100", "train")
    assert ds.images.shape == (5, 32, 32, 3) and ds.labels.dtype == np.int64
    assert len(ds.classes) == 100 and ds.classes[3] == "f3"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_code_in_pickles(isolated):
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    _write_cifar10(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"\.print is not allowed"):
        data.load("cifar10", "test")


def test_cifar_truncated_batch(isolated):
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    _write_cifar10(folder)
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[:200])
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", "test")


# ------------------------------------------------------------------ SVHN .mat
def test_svhn_mat_reader_maps_10_to_0(isolated):
    import scipy.io

    d = isolated / "svhn"
    d.mkdir()
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy.io.savemat(d / "test_32x32.mat", {"X": X, "y": np.array([[10], [1], [2], [10]], dtype=np.uint8)})
    with pytest.raises(ChecksumError, match="test_32x32.mat"):
        data.load("svhn", "test")
    ds = data.load("svhn", "test", verify=False)
    assert ds.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(ds.images[2], X[:, :, :, 2])
    assert ds.labels.tolist() == [0, 1, 2, 0]
    (d / "test_32x32.mat").write_bytes((d / "test_32x32.mat").read_bytes()[:300])
    with pytest.raises(ValueError, match="test_32x32.mat"):
        data.load("svhn", "test", verify=False)


# ------------------------------------------------------------------ folders and lists
def _png(path: Path, value: int, size=(10, 12), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_class_per_subfolder(tmp_path):
    root = tmp_path / "shapes"
    for cls, v in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(root / cls / f"{i}.png", v + i)
    ds = data.load(str(root))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 12, 10) and ds.images[3, 0, 0] == 200
    _png(root / "dog" / "big.png", 5, size=(20, 20))
    with pytest.raises(ValueError, match="size=\\(H, W\\)"):
        data.load_image_folder(root, progress=False)
    resized = data.load_image_folder(root, size=(8, 8), progress=False)
    assert resized.images.shape == (7, 8, 8)
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(root, size=(8, 8), progress=False)
    assert len(data.load_image_folder(root, size=(8, 8), skip_broken=True, progress=False)) == 7


def test_openood_image_list(tmp_path):
    root = tmp_path / "images_classic"
    for i in range(4):
        _png(root / "svhn" / "test" / f"{i}.png", 50 * i, mode="RGB")
    lst = tmp_path / "benchmark_imglist" / "test_svhn.txt"
    lst.parent.mkdir()
    lst.write_text("".join(f"svhn/test/{i}.png {i % 2}\n" for i in range(4)))
    ds = data.load_image_list(lst, root=root, progress=False)
    assert ds.images.shape == (4, 12, 10, 3) and ds.labels.tolist() == [0, 1, 0, 1]
    assert ds.images[2, 0, 0, 0] == 100
    with pytest.raises(FileNotFoundError, match="root="):
        data.load_image_list(lst, root=tmp_path, progress=False)


# ------------------------------------------------------------------ ImageDataset, tensors
def test_image_dataset_validation_and_subset():
    imgs = np.zeros((4, 5, 5), np.uint8)
    ds = data.ImageDataset(imgs, np.array([0, 1, 2, 3]), ["a", "b", "c", "d"], name="x")
    assert len(ds.subset([1, 3])) == 2 and ds.subset(np.array([True, False, True, False])).labels.tolist() == [0, 2]
    with pytest.raises(ValueError, match="uint8"):
        data.ImageDataset(imgs.astype(float))
    with pytest.raises(ValueError, match="labels must have shape"):
        data.ImageDataset(imgs, np.arange(3))


def test_to_tensor_and_loader():
    imgs = np.full((5, 4, 4), 255, np.uint8)
    x = data.to_tensor(imgs, mean=0.5, std=0.25)
    assert tuple(x.shape) == (5, 1, 4, 4) and float(x.max()) == pytest.approx(2.0)
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 2] = 255
    xr = data.to_tensor(rgb)
    assert tuple(xr.shape) == (2, 3, 4, 4) and float(xr[:, 2].min()) == 1.0 and float(xr[:, 0].max()) == 0.0
    with pytest.raises(ValueError, match="3 channels"):
        data.to_tensor(rgb, mean=[0.1, 0.2])
    ds = data.uniform_noise(10, (4, 4), seed=0)
    batches = list(data.loader(ds, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2] and int(batches[0][1][0]) == -1
    a = [b[1].tolist() for b in data.loader(data.ImageDataset(imgs, np.arange(5)), 2, shuffle=True, seed=3)]
    b = [b[1].tolist() for b in data.loader(data.ImageDataset(imgs, np.arange(5)), 2, shuffle=True, seed=3)]
    assert a == b


def test_random_shift_flip():
    import torch

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    assert torch.equal(data.RandomShiftFlip(0, False)(x), x)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    y1, y2 = data.RandomShiftFlip(2, True)(x, g1), data.RandomShiftFlip(2, True)(x, g2)
    assert y1.shape == x.shape and torch.equal(y1, y2)


def test_list_datasets_names():
    names = data.list_datasets()
    for n in ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn", "gaussian-noise",
              "fashion-mnist-c", "notmnist", "emnist-letters"):
        assert n in names


# ------------------------------------------------------------------ release layouts and bad files
def _write_idx_set(folder: Path, n=6, seed=0, shape=(28, 28), labels=None, prefix=""):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % 10 if labels is None else np.asarray(labels)
    for split in ("train", "t10k"):
        (folder / f"{prefix}{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(rng.integers(0, 256, (len(labels),) + shape, dtype=np.uint8))))
        (folder / f"{prefix}{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def test_debian_dataset_fashion_mnist_layout_is_found(isolated, tmp_path, monkeypatch):
    # dataset-fashion-mnist installs the four .gz files flat in /usr/share/datasets/fashion-mnist/
    system = tmp_path / "usr-share-datasets"
    _write_idx_set(system / "fashion-mnist")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (system,))
    assert data.find("fashion-mnist", "test", download=False) == system / "fashion-mnist"
    ds = data.load("fashion-mnist", "test", verify=False)
    assert len(ds) == 6 and ds.meta["source"].startswith(str(system))
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):  # not the published bytes
        data.load("fashion-mnist", "train")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt install dataset-fashion-mnist)")
def test_installed_debian_fashion_mnist_verifies(monkeypatch):
    # its .gz files were recompressed by Debian: accepted by the checksum of their content
    monkeypatch.setenv("OODSCOPE_DATA", "")
    monkeypatch.setenv("OODSCOPE_CACHE", "/nonexistent-oodscope-cache")
    clear_verification_cache()
    data.clear_cache()
    ds = data.load("fashion-mnist", "test", download=False)
    assert ds.meta["source"].startswith("/usr/share/datasets/fashion-mnist")
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    data.clear_cache()


@pytest.mark.parametrize("kind, message", [
    ("labels_out_of_range", r"labels span 0\.\.12, but kmnist has 10 classes"),
    ("one_label", "all 120 labels are 3"),
    ("wrong_shape", r"images are \(32, 32\)"),
    ("swapped", "do not match"),
])
def test_idx_files_that_cannot_be_the_dataset_are_refused(isolated, kind, message):
    d = isolated / "kmnist"
    if kind == "labels_out_of_range":
        _write_idx_set(d, labels=np.arange(13))
    elif kind == "one_label":
        _write_idx_set(d, labels=np.full(120, 3))
    elif kind == "wrong_shape":
        _write_idx_set(d, shape=(32, 32))
    else:
        _write_idx_set(d)
        img, lab = d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz"
        img_bytes = img.read_bytes()
        img.write_bytes(lab.read_bytes())
        lab.write_bytes(img_bytes)
    with pytest.raises(ValueError, match=message) as err:
        data.load("kmnist", "test", verify=False)
    assert "t10k-" in str(err.value)


def test_cifar_labels_outside_the_classes_are_refused(isolated):
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    _write_cifar10(folder)
    _dump_like_cifar(_cifar_batch(3, 9, n_classes=100), folder / "test_batch")
    with pytest.raises(ValueError, match="cifar10 has 10 classes"):
        data.load("cifar10", "test")


def test_openood_image_list_extra_fields(tmp_path):
    root = tmp_path / "images_classic"
    for i in range(3):
        _png(root / "cifar10" / "test" / f"{i}.png", 40 * i, mode="RGB")
    lst = tmp_path / "test_cifar10.txt"
    lst.write_text("cifar10/test/0.png {'label': 3, 'soft_label': [0.1, 0.9]}\n"
                   "cifar10/test/1.png -1\n\ncifar10/test/2.png {'label': 0}\n")
    ds = data.load_image_list(lst, root=root, progress=False)
    assert ds.labels.tolist() == [3, -1, 0] and ds.images[1, 0, 0, 0] == 40
    lst.write_text("cifar10/test/0.png {'x': 1}\n")
    with pytest.raises(ValueError, match=r"test_cifar10.txt:1: .*no integer 'label'"):
        data.load_image_list(lst, root=root, progress=False)
    lst.write_text("cifar10/test/0.png 1\ncifar10/test/1.png\n")
    with pytest.raises(ValueError, match="some lines have a label"):
        data.load_image_list(lst, root=root, progress=False)
    lst.write_text(f"{root}/cifar10/test/0.png 1\n")
    with pytest.raises(ValueError, match="absolute path"):
        data.load_image_list(lst, root=root, progress=False)
