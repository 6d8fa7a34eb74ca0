"""The builders of the benchmarks with a CLIP-like model in place of a classifier
(``oodscope bench ... --vlm``; their specs are in `oodscope.bench.catalog`).

Every builder embeds each split once with the image tower (cached on disk by model and
data), keeps ``extras["image_embeds"]`` (and ``"local_embeds"`` when GL-MCM is requested),
and passes ``encoder`` and ``class_names`` to the zero-shot detectors through
``FeatureSet.detector_kwargs``. ``info["id_accuracy"]`` is the zero-shot accuracy on test ID
with the prompt "a photo of a {}.".

* ``vlm-imagefolder``: ID classes are the sub-folders of ``id_dir``; OOD sets are folders.
* ``fashion-mnist-vlm``: Fashion-MNIST with its class names; runs offline (with any local model).
* ``imagenet-vlm``, ``imagenet200-vlm``, ``cifar10-vlm``, ``cifar100-vlm``: the OpenOOD v1.5
  image lists (`oodscope.bench.openood`) embedded with the VLM. The classifier benchmarks of
  the same protocols take ``--model``; given ``--vlm`` they run these instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..features import Features
from ..vlm.backends import DualEncoder, load
from .extract import SplitExtractor
from .openood import OPENOOD_PROTOCOLS, openood_root
from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = [
    "ClipExtractor",
    "build_fashion_mnist_clip",
    "build_imagefolder_clip",
    "build_openood_clip",
    "zero_shot_accuracy",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _require_vlm(options: ProviderOptions, benchmark: str) -> DualEncoder:
    if options.vlm is None:
        raise ValueError(
            f"Benchmark {benchmark!r} embeds images with a vision-language model: pass "
            "--vlm hf:<model or dir> (or open_clip:<arch>/<tag>), or vlm=<DualEncoder>.")
    if isinstance(options.vlm, DualEncoder):
        return options.vlm
    # text embeddings (class prompts, ~100k WordNet negatives) are cached beside the features
    return load(options.vlm, cache_dir=options.cache("vlm-text"))


def zero_shot_accuracy(encoder: DualEncoder, class_names: Sequence[str], f: Features) -> float | None:
    """Top-1 accuracy of zero-shot classification with "a photo of a {}."."""
    if f.labels is None or not np.any(f.labels >= 0):
        return None
    text = encoder.encode_text(list(class_names), ("a photo of a {}.",)).astype(np.float64)
    keep = f.labels >= 0
    pred = np.argmax(np.asarray(f.extras["image_embeds"][keep], dtype=np.float64) @ text.T, axis=1)
    return float(np.mean(pred == f.labels[keep]))


class ClipExtractor(SplitExtractor):
    """The image tower of a CLIP-like model over named splits (`oodscope.vlm.extract`); keeps
    patch embeddings only when GL-MCM may need them (``options.fields``)."""

    def __init__(self, encoder: DualEncoder, options: ProviderOptions, batch_size: int = 64):
        super().__init__(options.cache("vlm-features"), options.progress)
        self.encoder = encoder
        self.local = options.wants_field("local_embeds")
        self.batch_size = batch_size

    def _extract(self, name: str, data: Any) -> Features:
        from ..vlm.extract import extract

        return extract(self.encoder, data, local=self.local, cache_dir=self.cache, progress=self.progress,
                       batch_size=self.batch_size, preprocessed=False, desc=f"embed {name}")


def _finish(fs: FeatureSet, encoder: DualEncoder, names: list[str], ex: ClipExtractor,
            notes: list[str], val_ood_description: str | None = None) -> FeatureSet:
    fs.info.update(
        model=encoder.name,
        id_accuracy=zero_shot_accuracy(encoder, names, fs.test_id),
        id_accuracy_kind="zero-shot CLIP, prompt 'a photo of a {}.'",
        notes=notes,
        class_names=list(names),
        **ex.info(),
    )
    if val_ood_description is not None:
        fs.info["val_ood_description"] = val_ood_description
    fs.detector_kwargs["*"] = {"encoder": encoder, "class_names": list(names)}
    return fs


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_class_names(source: Any) -> list[str]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"class_names file {path} does not exist (one class name a line).")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [str(n) for n in source]
    if not names:
        raise ValueError("class_names is empty: give one name per ID class.")
    return names


def _load_square(paths: Sequence[Path], size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))
    return out


# --------------------------------------------------------------------------- image folders
def _labelled(root: Path) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for c, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        imgs = _list_images(folder)
        paths += imgs
        labels += [c] * len(imgs)
    if not paths:
        raise ValueError(f"No images under {root} (extensions {IMAGE_EXTENSIONS}).")
    return paths, np.asarray(labels, dtype=np.int64)


def build_imagefolder_clip(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """ID classes = sub-folders of ``id_dir`` (names from the folders, ``_`` → space, or
    ``--class-names``); OOD sets = ``ood_dirs`` (name → folder; those in ``near_ood`` count as
    near-OOD, the rest as far). ID images are split (seeded) into train (for COOkeD's
    probe), ID-val and test ID, unless ``train_dir`` (same class sub-folders) is given.
    Validation OOD: ``val_ood_dir``, else generated from ID-val images."""
    from ..data import generated_outliers

    p = spec.params
    encoder = _require_vlm(options, spec.name)
    id_dir, ood_dirs = p.get("id_dir"), p.get("ood_dirs")
    if id_dir is None or not Path(id_dir).is_dir():
        raise ValueError(f"vlm-imagefolder needs id_dir= a folder with one sub-folder per class, got {id_dir!r}.")
    if not ood_dirs:
        raise ValueError("vlm-imagefolder needs ood_dirs= {name: folder} (at least one OOD folder).")
    if isinstance(ood_dirs, dict):
        ood_map = {str(k): Path(v) for k, v in ood_dirs.items()}
    else:
        ood_map = {Path(d).name: Path(d) for d in ood_dirs}
    for k, d in ood_map.items():
        if not d.is_dir():
            raise ValueError(f"OOD folder {k!r} ({d}) does not exist.")
    unknown_near = sorted(set(p["near_ood"]) - set(ood_map))
    if unknown_near:
        raise ValueError(f"near_ood names {unknown_near} are not OOD sets ({sorted(ood_map)}).")
    folders = sorted(f for f in Path(id_dir).iterdir() if f.is_dir())
    if not folders:
        raise ValueError(f"{id_dir} has no class sub-folders.")
    names = (_read_class_names(options.class_names) if options.class_names is not None
             else [f.name.replace("_", " ") for f in folders])
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders in {id_dir}.")
    rng = np.random.default_rng(options.seed)

    def cap(paths: list[Path], labels: np.ndarray | None = None):
        if options.subset is None or len(paths) <= options.subset:
            return paths, labels
        idx = np.sort(rng.permutation(len(paths))[:options.subset])
        return [paths[i] for i in idx], (labels[idx] if labels is not None else None)

    paths, labels = _labelled(Path(id_dir))
    perm = rng.permutation(len(paths))
    n_val = max(1, round(p["val_fraction"] * len(paths)))
    if p["train_dir"] is not None:
        tr_paths, tr_labels = _labelled(Path(p["train_dir"]))
        val_idx, test_idx = perm[:n_val], perm[n_val:]
    else:
        n_train = max(1, round(p["train_fraction"] * len(paths)))
        tr_idx, val_idx, test_idx = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
        tr_paths, tr_labels = [paths[i] for i in np.sort(tr_idx)], labels[np.sort(tr_idx)]
    if len(test_idx) == 0:
        raise ValueError(f"{id_dir} has too few images ({len(paths)}) to split into train/val/test.")
    val_paths, val_labels = [paths[i] for i in np.sort(val_idx)], labels[np.sort(val_idx)]
    te_paths, te_labels = [paths[i] for i in np.sort(test_idx)], labels[np.sort(test_idx)]

    ex = ClipExtractor(encoder, options)
    if p["val_ood_dir"] is not None:
        val_ood = ex("val_ood", cap(_list_images(Path(p["val_ood_dir"])))[0])
        val_desc = f"images from {p['val_ood_dir']}"
    else:
        val_ood = ex("val_ood", generated_outliers(_load_square(val_paths, encoder.image_size), options.seed))
        val_desc = None  # the spec's recipe
    near, far = {}, {}
    for k, d in ood_map.items():
        imgs = _list_images(d)
        if not imgs:
            raise ValueError(f"OOD folder {k!r} ({d}) has no images.")
        (near if k in p["near_ood"] else far)[k] = ex(k, cap(imgs)[0])
    fs = FeatureSet(
        train=ex("train", cap(tr_paths, tr_labels)),
        val_id=ex("val_id", cap(val_paths, val_labels)),
        val_ood=val_ood,
        test_id=ex("test_id", cap(te_paths, te_labels)),
        near_ood=near,
        far_ood=far,
    )
    return _finish(fs, encoder, names, ex, [f"ID classes from {id_dir}"], val_desc)


# --------------------------------------------------------------------------- Fashion-MNIST
def build_fashion_mnist_clip(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """Fashion-MNIST (class names from the dataset) with a VLM; OOD MNIST (if present) and
    noise. Runs offline with a local model directory."""
    from .. import data as D

    encoder = _require_vlm(options, spec.name)
    val_size, noise_size = spec.params["val_size"], spec.params["noise_size"]
    train_all = D.load("fashion-mnist", "train", root=options.data_root)
    test = D.load("fashion-mnist", "test", root=options.data_root)
    perm = np.random.default_rng(options.seed).permutation(len(train_all))
    val = options.cap(train_all.subset(np.sort(perm[:val_size]), name="fashion-mnist/val"))
    train = options.cap(train_all.subset(np.sort(perm[val_size:]), name="fashion-mnist/train-fit"))
    test = options.cap(test)
    sets: dict[str, Any] = {}
    notes: list[str] = []
    if options.wants("mnist"):
        try:
            sets["mnist"] = options.cap(D.load("mnist", "test"))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            if options.ood is not None:
                raise
            notes.append(f"mnist skipped: {str(exc).splitlines()[0][:160]}")
    n_noise = min(noise_size, options.subset) if options.subset else noise_size
    for k, (make, offset) in {"gaussian-noise": (D.gaussian_noise, 1), "uniform-noise": (D.uniform_noise, 2)}.items():
        if options.wants(k):
            sets[k] = make(n_noise, (28, 28), seed=options.seed + offset)
    ex = ClipExtractor(encoder, options)
    fs = FeatureSet(
        train=ex("train", (train.images, train.labels)),
        val_id=ex("val_id", (val.images, val.labels)),
        val_ood=ex("val_ood", D.generated_outliers(val.images, options.seed)),
        test_id=ex("test_id", (test.images, test.labels)),
        far_ood={k: ex(k, v.images) for k, v in sets.items()},
    )
    return _finish(fs, encoder, list(train_all.classes), ex, notes)


# --------------------------------------------------------------------------- OpenOOD v1.5
def _read_list(list_file: Path, images_dir: Path) -> tuple[list[Path], np.ndarray | None]:
    paths, labels = [], []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            paths.append(images_dir / parts[0])
            labels.append(int(parts[1]))
        else:
            paths.append(images_dir / line)
            labels.append(None)
    if not paths:
        raise ValueError(f"{list_file}: no entries.")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{list_file}: {len(missing)} listed images are missing, e.g. {missing[0]}.")
    if any(l is None for l in labels):
        return paths, None
    return paths, np.asarray(labels, dtype=np.int64)


def _openood_class_names(protocol: str, root: Path, class_names: Any) -> list[str]:
    if class_names is not None:
        return _read_class_names(class_names)
    if protocol == "cifar10":
        return list(CIFAR10_CLASSES)
    candidates = [root / "class_names" / f"{protocol}.txt",
                  root / "benchmark_imglist" / protocol / "class_names.txt"]
    for c in candidates:
        if c.is_file():
            return _read_class_names(c)
    raise ValueError(
        f"Benchmark {protocol}-vlm needs the ID class names (one a line, in label order): pass "
        f"class_names=, or put them in {candidates[0]}. For ImageNet, CLIP's curated names are "
        "the usual choice.")


def build_openood_clip(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """An OpenOOD v1.5 protocol embedded with a VLM. Zero-shot detectors use only ID-val,
    val-OOD and the test sets; the train split (``train_per_class`` images per class,
    seeded; None = all) feeds COOkeD's linear probe."""
    if options.vlm is None:
        _require_vlm(options, spec.name)  # the "pass --vlm" message
    proto = OPENOOD_PROTOCOLS[spec.params["protocol"]]
    per_class = spec.params.get("train_per_class")
    needed = proto.needed(options.wants, covariate=False)
    root = openood_root(options.data_root, needed, spec.name)
    names = _openood_class_names(proto.name, root, options.class_names)
    if len(names) != proto.num_classes:
        raise ValueError(f"{len(names)} class names for the {proto.num_classes} classes of {proto.name}.")
    # the model loads only once the data is known to be there
    encoder = _require_vlm(options, spec.name)
    rng = np.random.default_rng(options.seed)

    def split(key: str, per_class: int | None = None):
        paths, labels = _read_list(root / needed[key], proto.images_dir(root, key))
        idx = np.arange(len(paths))
        if per_class is not None and labels is not None:
            idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                  for c in np.unique(labels)])
        if options.subset is not None and len(idx) > options.subset:
            idx = rng.permutation(idx)[:options.subset]
        idx = np.sort(idx)
        return [paths[i] for i in idx], (labels[idx] if labels is not None else None)

    ex = ClipExtractor(encoder, options)
    fs = FeatureSet(
        train=ex("train", split("train", per_class)),
        val_id=ex("val_id", split("val_id")),
        val_ood=ex("val_ood", split("val_ood")[0]),
        test_id=ex("test_id", split("test_id")),
        near_ood={k: ex(k, split(k)[0]) for k in proto.near if k in needed},
        far_ood={k: ex(k, split(k)[0]) for k in proto.far if k in needed},
    )
    notes = [f"OpenOOD v1.5 protocol {proto.name!r} with a VLM, data from {root}",
             f"train split: {per_class} images per class (COOkeD probe only)"]
    return _finish(fs, encoder, names, ex, notes)
