"""Benchmarks with a CLIP-like model in place of a classifier (``oodscope bench ... --vlm``).

Every provider embeds each split once with the image tower (cached on disk by model and
data), keeps ``extras["image_embeds"]`` (and ``"local_embeds"`` when GL-MCM is requested),
and passes ``encoder`` and ``class_names`` to the zero-shot detectors through
``FeatureSet.detector_kwargs``. ``info["id_accuracy"]`` is the zero-shot accuracy on test ID
with the prompt "a photo of a {}.".

* ``vlm-imagefolder``: ID classes are the sub-folders of ``id_dir``; OOD sets are folders.
* ``fashion-mnist-vlm``: Fashion-MNIST with its class names; runs offline (with any local model).
* ``imagenet-vlm``, ``imagenet200-vlm``, ``cifar10-vlm``, ``cifar100-vlm``: the OpenOOD v1.5
  image lists (`oodscope.bench.vision.OPENOOD_PROTOCOLS`) embedded with the VLM. The
  classifier-based providers of the same protocols take ``--model``; these take ``--vlm``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bench.spec import FeatureSet, register_benchmark
from ..features import Features
from .backends import DualEncoder, load

__all__ = [
    "VLM_DETECTORS",
    "fashion_mnist_vlm",
    "imagefolder_vlm",
    "openood_vlm",
    "zero_shot_accuracy",
]

VLM_DETECTORS = ["mcm", "glmcm", "neglabel", "adaneg"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _require_vlm(vlm: Any, benchmark: str, cache_dir: str | Path | None = None) -> DualEncoder:
    if vlm is None:
        raise ValueError(
            f"Benchmark {benchmark!r} embeds images with a vision-language model: pass "
            "--vlm hf:<model or dir> (or open_clip:<arch>/<tag>), or vlm=<DualEncoder>.")
    if isinstance(vlm, DualEncoder):
        return vlm
    # text embeddings (class prompts, ~100k WordNet negatives) are cached beside the features
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "oodscope"
    return load(vlm, cache_dir=base / "vlm-text")


def _wants_local(fields: Iterable[str] | None) -> bool:
    return fields is None or "local_embeds" in set(fields)


def zero_shot_accuracy(encoder: DualEncoder, class_names: Sequence[str], f: Features) -> float | None:
    """Top-1 accuracy of zero-shot classification with "a photo of a {}."."""
    if f.labels is None or not np.any(f.labels >= 0):
        return None
    text = encoder.encode_text(list(class_names), ("a photo of a {}.",)).astype(np.float64)
    keep = f.labels >= 0
    pred = np.argmax(np.asarray(f.extras["image_embeds"][keep], dtype=np.float64) @ text.T, axis=1)
    return float(np.mean(pred == f.labels[keep]))


class _Embedder:
    def __init__(self, encoder: DualEncoder, local: bool, cache_dir, progress: bool, batch_size: int = 64):
        self.encoder = encoder
        self.local = local
        base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "oodscope"
        self.cache = base / "vlm-features"
        self.progress = progress
        self.batch_size = batch_size
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, data: Any, labels: np.ndarray | None = None) -> Features:
        from .extract import extract

        t0 = time.perf_counter()
        src = data if labels is None else (data, labels)
        f = extract(self.encoder, src, local=self.local, cache_dir=self.cache, progress=self.progress,
                    batch_size=self.batch_size, preprocessed=False, desc=f"embed {name}")
        if f.labels is None:
            f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
        self.timings[name] = time.perf_counter() - t0
        return f


def _finish(fs: FeatureSet, encoder: DualEncoder, names: list[str], ex: _Embedder,
            val_ood_description: str, notes: list[str]) -> FeatureSet:
    fs.info.update(
        model=encoder.name,
        id_accuracy=zero_shot_accuracy(encoder, names, fs.test_id),
        id_accuracy_kind="zero-shot CLIP, prompt 'a photo of a {}.'",
        val_ood_description=val_ood_description,
        timings=dict(ex.timings),
        notes=notes,
        class_names=list(names),
    )
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


def _generated_val_ood(images: np.ndarray, seed: int) -> np.ndarray:
    from ..bench.vision import box_blur, patch_shuffle

    half = len(images) // 2
    return np.concatenate([patch_shuffle(images[:half], grid=4, seed=seed),
                           box_blur(images[half:], radius=max(1, images.shape[1] // 14), passes=3)])


_GENERATED_VAL_OOD = ("Generated from held-out ID validation images: half patch-shuffled (4×4 "
                      "grid), half heavily blurred; no test OOD image is used for tuning.")


# --------------------------------------------------------------------------- image folders
def imagefolder_vlm(
    vlm: Any = None,
    id_dir: str | Path | None = None,
    ood_dirs: dict[str, str | Path] | Sequence[str | Path] | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    near_ood: Sequence[str] = (),
    train_dir: str | Path | None = None,
    val_ood_dir: str | Path | None = None,
    train_fraction: float = 0.3,
    val_fraction: float = 0.1,
    subset: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    fields: Iterable[str] | None = None,
    progress: bool = True,
) -> FeatureSet:
    """ID classes = sub-folders of ``id_dir`` (names from the folders, ``_`` → space, or
    ``class_names``); OOD sets = ``ood_dirs`` (name → folder; those in ``near_ood`` count as
    near-OOD, the rest as far). ID images are split (seeded) into train (for COOkeD's
    probe), ID-val and test ID, unless ``train_dir`` (same class sub-folders) is given.
    Validation OOD: ``val_ood_dir``, else generated from ID-val images."""
    encoder = _require_vlm(vlm, "vlm-imagefolder", cache_dir)
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
    unknown_near = sorted(set(near_ood) - set(ood_map))
    if unknown_near:
        raise ValueError(f"near_ood names {unknown_near} are not OOD sets ({sorted(ood_map)}).")
    folders = sorted(p for p in Path(id_dir).iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{id_dir} has no class sub-folders.")
    names = (_read_class_names(class_names) if class_names is not None
             else [f.name.replace("_", " ") for f in folders])
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders in {id_dir}.")
    rng = np.random.default_rng(seed)

    def labelled(root: Path) -> tuple[list[Path], np.ndarray]:
        paths, labels = [], []
        for c, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
            imgs = _list_images(folder)
            paths += imgs
            labels += [c] * len(imgs)
        if not paths:
            raise ValueError(f"No images under {root} (extensions {IMAGE_EXTENSIONS}).")
        return paths, np.asarray(labels, dtype=np.int64)

    def cap(paths: list[Path], labels: np.ndarray | None = None):
        if subset is None or len(paths) <= subset:
            return paths, labels
        idx = np.sort(rng.permutation(len(paths))[:subset])
        return [paths[i] for i in idx], (labels[idx] if labels is not None else None)

    paths, labels = labelled(Path(id_dir))
    perm = rng.permutation(len(paths))
    n_val = max(1, round(val_fraction * len(paths)))
    if train_dir is not None:
        tr_paths, tr_labels = labelled(Path(train_dir))
        val_idx, test_idx = perm[:n_val], perm[n_val:]
    else:
        n_train = max(1, round(train_fraction * len(paths)))
        tr_idx, val_idx, test_idx = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
        tr_paths, tr_labels = [paths[i] for i in np.sort(tr_idx)], labels[np.sort(tr_idx)]
    if len(test_idx) == 0:
        raise ValueError(f"{id_dir} has too few images ({len(paths)}) to split into train/val/test.")
    val_paths, val_labels = [paths[i] for i in np.sort(val_idx)], labels[np.sort(val_idx)]
    te_paths, te_labels = [paths[i] for i in np.sort(test_idx)], labels[np.sort(test_idx)]

    ex = _Embedder(encoder, _wants_local(fields), cache_dir, progress)
    if val_ood_dir is not None:
        val_ood = ex("val_ood", cap(_list_images(Path(val_ood_dir)))[0])
        val_desc = f"images from {val_ood_dir}"
    else:
        val_ood = ex("val_ood", _generated_val_ood(_load_square(val_paths, encoder.image_size), seed))
        val_desc = _GENERATED_VAL_OOD
    near, far = {}, {}
    for k, d in ood_map.items():
        imgs = _list_images(d)
        if not imgs:
            raise ValueError(f"OOD folder {k!r} ({d}) has no images.")
        (near if k in near_ood else far)[k] = ex(k, cap(imgs)[0])
    fs = FeatureSet(
        train=ex("train", *cap(tr_paths, tr_labels)),
        val_id=ex("val_id", *cap(val_paths, val_labels)),
        val_ood=val_ood,
        test_id=ex("test_id", *cap(te_paths, te_labels)),
        near_ood=near,
        far_ood=far,
    )
    return _finish(fs, encoder, names, ex, val_desc, [f"ID classes from {id_dir}"])


# --------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_vlm(
    vlm: Any = None,
    subset: int | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    ood: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
    val_size: int = 2000,
    noise_size: int = 2000,
) -> FeatureSet:
    """Fashion-MNIST (class names from the dataset) with a VLM; OOD MNIST (if present) and
    noise. Runs offline with a local model directory."""
    from .. import data as D

    encoder = _require_vlm(vlm, "fashion-mnist-vlm", cache_dir)
    if subset is None and quick:
        subset = 500
    rng = np.random.default_rng(seed)
    train_all = D.load("fashion-mnist", "train", root=data_root)
    test = D.load("fashion-mnist", "test", root=data_root)
    perm = rng.permutation(len(train_all))
    val = train_all.subset(np.sort(perm[:val_size]), name="fashion-mnist/val")
    train = train_all.subset(np.sort(perm[val_size:]), name="fashion-mnist/train-fit")

    def cap(ds):
        return ds if subset is None or len(ds) <= subset else ds.sample(subset, seed=seed)

    train, val, test = cap(train), cap(val), cap(test)
    names = list(train_all.classes)
    wanted = None if ood is None else {o.lower() for o in ood}
    sets: dict[str, Any] = {}
    notes: list[str] = []
    if wanted is None or "mnist" in wanted:
        try:
            sets["mnist"] = cap(D.load("mnist", "test"))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            if wanted is not None:
                raise
            notes.append(f"mnist skipped: {str(exc).splitlines()[0][:160]}")
    n_noise = min(noise_size, subset) if subset else noise_size
    if wanted is None or "gaussian-noise" in wanted:
        sets["gaussian-noise"] = D.gaussian_noise(n_noise, (28, 28), seed=seed + 1)
    if wanted is None or "uniform-noise" in wanted:
        sets["uniform-noise"] = D.uniform_noise(n_noise, (28, 28), seed=seed + 2)
    ex = _Embedder(encoder, _wants_local(fields), cache_dir, progress)
    fs = FeatureSet(
        train=ex("train", train.images, train.labels),
        val_id=ex("val_id", val.images, val.labels),
        val_ood=ex("val_ood", _generated_val_ood(val.images, seed)),
        test_id=ex("test_id", test.images, test.labels),
        far_ood={k: ex(k, v.images) for k, v in sets.items()},
    )
    return _finish(fs, encoder, names, ex, _GENERATED_VAL_OOD, notes)


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


def openood_vlm(
    protocol: str,
    vlm: Any = None,
    class_names: Sequence[str] | str | Path | None = None,
    data_root: str | Path | None = None,
    subset: int | None = None,
    train_per_class: int | None = 16,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    ood: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    progress: bool = True,
) -> FeatureSet:
    """An OpenOOD v1.5 protocol embedded with a VLM. Zero-shot detectors use only ID-val,
    val-OOD and the test sets; the train split (``train_per_class`` images per class,
    seeded; None = all) feeds COOkeD's linear probe."""
    from ..bench.vision import OPENOOD_PROTOCOLS, _openood_root

    if vlm is None:
        _require_vlm(vlm, f"{protocol}-vlm", cache_dir)  # the "pass --vlm" message
    proto = OPENOOD_PROTOCOLS[protocol]
    root = _openood_root(data_root)
    if subset is None and quick:
        subset = 1000
    wanted = None if ood is None else {o.lower() for o in ood}
    needed = dict(proto.lists)
    for k, v in {**proto.near, **proto.far}.items():
        if wanted is None or k in wanted:
            needed[k] = v
    missing = [str(root / p) for p in needed.values() if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"Benchmark {protocol}-vlm needs the OpenOOD v1.5 image lists and images under {root} "
            "(set OODSCOPE_DATA, whose 'openood' folder is used, or pass --data-root). Missing:\n  "
            + "\n  ".join(missing))
    names = _openood_class_names(protocol, root, class_names)
    if len(names) != proto.num_classes:
        raise ValueError(f"{len(names)} class names for the {proto.num_classes} classes of {protocol}.")
    # the model loads only once the data is known to be there
    encoder = _require_vlm(vlm, f"{protocol}-vlm", cache_dir)
    rng = np.random.default_rng(seed)

    def split(key: str, rel: str, per_class: int | None = None):
        paths, labels = _read_list(root / rel, root / proto.list_roots.get(key, proto.images))
        idx = np.arange(len(paths))
        if per_class is not None and labels is not None:
            idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                  for c in np.unique(labels)])
        if subset is not None and len(idx) > subset:
            idx = rng.permutation(idx)[:subset]
        idx = np.sort(idx)
        return [paths[i] for i in idx], (labels[idx] if labels is not None else None)

    ex = _Embedder(encoder, _wants_local(fields), cache_dir, progress)
    fs = FeatureSet(
        train=ex("train", *split("train", proto.lists["train"], train_per_class)),
        val_id=ex("val_id", *split("val_id", proto.lists["val_id"])),
        val_ood=ex("val_ood", split("val_ood", proto.lists["val_ood"])[0]),
        test_id=ex("test_id", *split("test_id", proto.lists["test_id"])),
        near_ood={k: ex(k, split(k, v)[0]) for k, v in proto.near.items() if k in needed},
        far_ood={k: ex(k, split(k, v)[0]) for k, v in proto.far.items() if k in needed},
    )
    notes = [f"OpenOOD v1.5 protocol {protocol!r} with a VLM, data from {root}",
             f"train split: {train_per_class} images per class (COOkeD probe only)"]
    return _finish(fs, encoder, names, ex, proto.val_ood_description, notes)


def _register() -> None:
    import inspect
    from functools import partial

    register_benchmark(
        "vlm-imagefolder", imagefolder_vlm,
        "CLIP zero-shot: ID classes = sub-folders of id_dir, OOD = folders; needs vlm=, id_dir=, ood_dirs=",
        default_detectors=VLM_DETECTORS,
    )
    register_benchmark(
        "fashion-mnist-vlm", fashion_mnist_vlm,
        "CLIP zero-shot on Fashion-MNIST (OOD MNIST, noise); needs --vlm; runs offline",
        default_detectors=VLM_DETECTORS,
        ood_names=["mnist", "gaussian-noise", "uniform-noise"],
    )
    try:
        from ..bench.vision import OPENOOD_PROTOCOLS
    except ImportError:  # the vision benchmarks are optional for the VLM ones
        return
    sig = inspect.signature(openood_vlm)
    sig = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "protocol"])
    for name, proto in OPENOOD_PROTOCOLS.items():
        provider = partial(openood_vlm, name)
        provider.__signature__ = sig
        register_benchmark(
            f"{name}-vlm", provider,
            f"OpenOOD v1.5 {name} with a CLIP model (--vlm): near {'/'.join(proto.near)}, far "
            f"{'/'.join(proto.far)}; needs the data and ID class names",
            default_detectors=VLM_DETECTORS,
            ood_names=[*proto.near, *proto.far],
        )


_register()
