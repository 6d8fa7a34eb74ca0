"""The registered datasets: files, canonical URLs, checksums and class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import ImageDataset
from .formats import parse_idx, read_cifar, read_image_folder, read_svhn_mat
from .registry import DatasetSpec, FileSpec, locate, read_verified, register_dataset

__all__ = ["CIFAR10_CLASSES", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LETTERS_A_J = list("ABCDEFGHIJ")


def _idx_files(base_urls: tuple[str, ...], prefix: str, checks: dict[str, tuple[tuple[str, ...], str | None]]):
    def fs(stem: str) -> FileSpec:
        sha, raw = checks.get(stem, ((), None))
        fname = f"{prefix}{stem}.gz"
        return FileSpec(fname, urls=tuple(u + fname for u in base_urls), sha256=sha, raw_sha256=raw,
                        alternatives=(f"{prefix}{stem}", f"{prefix}{stem.replace('-idx', '.idx')}"))

    return {
        "train": (fs("train-images-idx3-ubyte"), fs("train-labels-idx1-ubyte")),
        "test": (fs("t10k-images-idx3-ubyte"), fs("t10k-labels-idx1-ubyte")),
    }


def _check_labels(labels: np.ndarray, n_classes: int, source: str, name: str) -> None:
    """Refuse labels that cannot belong to ``name``: outside its class range, or one value
    for a whole split."""
    if labels.size == 0:
        raise ValueError(f"{source}: no samples.")
    lo, hi = int(labels.min()), int(labels.max())
    if n_classes and (lo < 0 or hi >= n_classes):
        raise ValueError(f"{source}: labels span {lo}..{hi}, but {name} has {n_classes} classes "
                         f"(0..{n_classes - 1}); this is not a {name} label file.")
    if labels.size >= 100 and lo == hi:
        raise ValueError(f"{source}: all {labels.size} labels are {lo}; a split of {name} has "
                         "several classes (wrong or corrupt file?).")


_IDX_IMAGE_SHAPE = (28, 28)


def _read_idx_split(spec: DatasetSpec, directory: Path, split: str, verify: bool = True, **_) -> ImageDataset:
    img_fs, lab_fs = spec.splits[split]
    img_path, lab_path = locate(directory, img_fs), locate(directory, lab_fs)
    images = parse_idx(read_verified(img_path, img_fs, verify), str(img_path))
    labels = parse_idx(read_verified(lab_path, lab_fs, verify), str(lab_path)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{img_path} / {lab_path}: {images.shape} images do not match {labels.shape} labels.")
    if images.shape[1:] != _IDX_IMAGE_SHAPE:
        raise ValueError(f"{img_path}: images are {images.shape[1:]}, {spec.name} images are "
                         f"{_IDX_IMAGE_SHAPE}.")
    if spec.options.get("transpose"):
        images = images.transpose(0, 2, 1)
    labels = labels - spec.options.get("label_offset", 0)
    _check_labels(labels, len(spec.classes), str(lab_path), spec.name)
    return ImageDataset(np.ascontiguousarray(images, dtype=np.uint8), labels, list(spec.classes),
                        name=f"{spec.name}/{split}", meta={"source": str(img_path)})


# ---------------------------------------------------------------- MNIST family (IDX)
#: Published checksums of the four IDX files: per dataset, file stem -> (SHA-256 of the .gz,
#: SHA-256 of the decompressed file where known).
_IDX_SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    "mnist": {
        "train-images-idx3-ubyte": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", None),
        "train-labels-idx1-ubyte": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", None),
        "t10k-images-idx3-ubyte": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    "kmnist": {
        "train-images-idx3-ubyte": ("51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", None),
        "train-labels-idx1-ubyte": ("e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", None),
        "t10k-images-idx3-ubyte": ("edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", None),
        "t10k-labels-idx1-ubyte": ("20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", None),
    },
}


def _idx_spec(name: str, classes: list[str], mirrors: tuple[str, ...], **about: str) -> DatasetSpec:
    """A dataset published as MNIST's four gzipped IDX files under each of ``mirrors``."""
    checks = {stem: ((gz,), raw) for stem, (gz, raw) in _IDX_SHA256[name].items()}
    return DatasetSpec(name=name, classes=classes, reader=_read_idx_split,
                       splits=_idx_files(mirrors, "", checks), **about)


register_dataset(_idx_spec(
    "fashion-mnist", FASHION_MNIST_CLASSES, ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    description="Fashion-MNIST (Xiao et al., 2017): 28x28 grey clothing, 10 classes, 60k/10k",
    homepage="https://github.com/zalandoresearch/fashion-mnist", licence="MIT"))
register_dataset(_idx_spec(
    "mnist", DIGITS, ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    description="MNIST (LeCun et al., 1998): 28x28 grey handwritten digits, 60k/10k",
    homepage="http://yann.lecun.com/exdb/mnist/", licence="CC BY-SA 3.0"))
register_dataset(_idx_spec(
    "kmnist", KMNIST_CLASSES, ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    description="Kuzushiji-MNIST (Clanuwat et al., 2018): 28x28 grey cursive Japanese, 10 classes",
    homepage="https://github.com/rois-codh/kmnist", licence="CC BY-SA 4.0"))

# EMNIST ships as one large zip (https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip) holding
# IDX files named emnist-<subset>-<split>-...; its images are stored transposed.
_EMNIST_SUBSETS = {"letters": (1, [chr(ord("A") + i) for i in range(26)]), "digits": (0, DIGITS),
                   "mnist": (0, DIGITS), "balanced": (0, []), "byclass": (0, []), "bymerge": (0, [])}
for _subset, (_offset, _classes) in _EMNIST_SUBSETS.items():
    register_dataset(DatasetSpec(
        name=f"emnist-{_subset}",
        description=f"EMNIST {_subset} (Cohen et al., 2017): 28x28 grey handwritten characters",
        homepage="https://www.nist.gov/itl/products-and-services/emnist-dataset (gzip.zip; put its "
                 "emnist-*-idx*-ubyte.gz files in emnist-<subset>/)",
        licence="public domain (NIST)",
        classes=_classes,
        reader=_read_idx_split,
        options={"transpose": True, "label_offset": _offset},
        splits={
            split: tuple(FileSpec(f"emnist-{_subset}-{split}-{kind}.gz", alternatives=(
                f"emnist-{_subset}-{split}-{kind}", f"gzip/emnist-{_subset}-{split}-{kind}.gz"))
                for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
            for split in ("train", "test")
        },
    ))


def _read_notmnist(spec: DatasetSpec, directory: Path, split: str, verify: bool = True,
                   progress: bool = True, **_) -> ImageDataset:
    if split in spec.options.get("idx_splits", {}) and all(
            locate(directory, fs) for fs in spec.options["idx_splits"][split]):
        sub = DatasetSpec(spec.name, "", spec.options["idx_splits"], _read_idx_split, spec.classes)
        return _read_idx_split(sub, directory, split, verify)
    folder = locate(directory, spec.splits[split][0])
    images, labels, classes = read_image_folder(folder, size=(28, 28), mode="L", skip_broken=True,
                                                progress=progress)
    return ImageDataset(images, labels, classes, name=f"{spec.name}/{split}", meta={"source": str(folder)})


register_dataset(DatasetSpec(
    name="notmnist",
    description="notMNIST (Bulatov, 2011): 28x28 grey glyphs of letters A-J in many fonts",
    homepage="http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html (notMNIST_small.tar.gz "
             "for 'test', notMNIST_large for 'train'; or IDX files named like MNIST's)",
    classes=LETTERS_A_J,
    reader=_read_notmnist,
    options={"idx_splits": _idx_files((), "", {})},
    splits={
        "test": (FileSpec("notMNIST_small", alternatives=("test", "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")),),
        "train": (FileSpec("notMNIST_large", alternatives=("train", "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),),
    },
))


# ---------------------------------------------------------------- CIFAR (python batches)
def _read_cifar(spec: DatasetSpec, directory: Path, split: str, verify: bool = True, **_) -> ImageDataset:
    fs = spec.splits[split][0]
    location = locate(directory, fs)
    if location.is_file():
        read_verified(location, fs, verify) if verify else None
    opts = spec.options
    if location.is_dir() and not (location / opts[split][0]).exists():
        raise FileNotFoundError(f"{location} does not contain {opts[split][0]}.")
    images, labels, classes = read_cifar(location, opts[split], opts["meta"], opts.get("label_key"))
    _check_labels(labels, opts["n_classes"], str(location), spec.name)
    return ImageDataset(images, labels, classes or list(spec.classes), name=f"{spec.name}/{split}",
                        meta={"source": str(location)})


def _cifar_spec(name, archive, folder, url, sha256, md5, splits, meta, label_key, classes, description,
                n_classes):
    fs = FileSpec(archive, urls=(url,), sha256=sha256, md5=md5, alternatives=(folder,))
    return DatasetSpec(
        name=name, description=description, homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        licence="see homepage", classes=classes, reader=_read_cifar,
        splits={s: (fs,) for s in splits},
        options={**splits, "meta": meta, "label_key": label_key, "n_classes": n_classes})


register_dataset(_cifar_spec(
    "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",),
    ("c58f30108f718f92721af3b95e74349a",),
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "batches.meta", "labels",
    CIFAR10_CLASSES, "CIFAR-10 (Krizhevsky, 2009): 32x32 RGB, 10 classes, 50k/10k", 10))

register_dataset(_cifar_spec(
    "cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", (),
    ("eb9058c3a382ffc7106e4002c42a8d85",),
    {"train": ["train"], "test": ["test"]}, "meta", "fine_labels",
    [], "CIFAR-100 (Krizhevsky, 2009): 32x32 RGB, 100 fine classes, 50k/10k", 100))


# ---------------------------------------------------------------- SVHN (.mat)
def _read_svhn(spec: DatasetSpec, directory: Path, split: str, verify: bool = True, **_) -> ImageDataset:
    fs = spec.splits[split][0]
    path = locate(directory, fs)
    if verify:
        read_verified(path, fs, verify)
    images, labels = read_svhn_mat(path)
    _check_labels(labels, len(DIGITS), str(path), spec.name)
    return ImageDataset(images, labels, DIGITS, name=f"svhn/{split}", meta={"source": str(path)})


register_dataset(DatasetSpec(
    name="svhn",
    description="SVHN cropped digits (Netzer et al., 2011): 32x32 RGB house numbers, 73k/26k (+531k extra)",
    homepage="http://ufldl.stanford.edu/housenumbers/",
    licence="non-commercial use",
    classes=DIGITS,
    reader=_read_svhn,
    splits={
        s: (FileSpec(f"{s}_32x32.mat", urls=(f"http://ufldl.stanford.edu/housenumbers/{s}_32x32.mat",), md5=(m,)),)
        for s, m in (("train", "e26dedcc434d2e4c54c9b2d4a06d8373"), ("test", "eb5a983be6a315427106f1b164d9cef3"),
                     ("extra", "a93ce644f1a588dc4d68dda5feec44a7"))
    },
))
