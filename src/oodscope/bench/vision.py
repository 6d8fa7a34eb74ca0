"""Vision benchmarks as data: Fashion-MNIST (runs offline) and the OpenOOD v1.5 protocols.

Each provider runs the network once per split (cached on disk by model and data) and
returns a `FeatureSet`; the runner does everything else from cached Features.

* ``fashion-mnist``: ID Fashion-MNIST. The train split minus a held-out part fits the
  detectors, the held-out part is ID-val, the test split is test ID. Test OOD (far): MNIST,
  KMNIST and notMNIST when their files are present (skipped with a note otherwise),
  Gaussian and uniform noise. Covariate shift: Fashion-MNIST-C style corruptions of the
  test split. Validation OOD: outliers generated from held-out ID images (patch-shuffled
  and heavily blurred) — a source that is none of the test OOD sets.
* ``cifar10``, ``cifar100``, ``imagenet200``, ``imagenet``: the OpenOOD v1.5 splits defined
  by its image-list files; they need ``--model`` and the data on disk (OpenOOD's layout
  under ``$OODSCOPE_DATA/openood`` or ``--data-root``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..features import Features
from .spec import FeatureSet, register_benchmark

__all__ = ["fashion_mnist", "fashion_mnist_splits", "OPENOOD_PROTOCOLS", "openood", "patch_shuffle", "box_blur",
           "model_normalization"]

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_OOD = {"mnist": "far", "kmnist": "far", "notmnist": "far", "gaussian-noise": "far",
              "uniform-noise": "far"}
FMNIST_COVARIATE = "fashion-mnist-c"
FMNIST_VAL_OOD = (
    "Generated outliers from held-out Fashion-MNIST training images (never from the test "
    "split): half patch-shuffled (each image cut into a 4×4 grid of 7×7 patches, randomly "
    "permuted), half heavily blurred (repeated box blur)."
)
FMNIST_VAL_WHY = (
    "Hyperparameters must be chosen without seeing any test OOD set. These outliers keep "
    "the ID pixel statistics but destroy object shape, so they reward detectors that model "
    "what a garment looks like, without resembling MNIST, KMNIST, notMNIST or noise (the "
    "test OOD sets); tuning on MNIST itself would inflate the MNIST numbers."
)


# --------------------------------------------------------------------------- outliers
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


# --------------------------------------------------------------------------- helpers
def _feature_cache(cache_dir: str | Path | None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "oodscope"
    return base / "features"


def _check_model(model, num_classes: int, in_shape: tuple[int, ...], source: str) -> None:
    """A clear error when a checkpoint does not fit the benchmark (input shape / classes)."""
    import torch

    try:
        p = next(model.parameters())
        x = torch.zeros((2, *in_shape), dtype=p.dtype, device=p.device)
    except StopIteration:
        x = torch.zeros((2, *in_shape))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ValueError(
            f"The model from {source} cannot process this benchmark's inputs of shape "
            f"{tuple(in_shape)} (channels, height, width): {type(exc).__name__}: {exc}. "
            "Is the checkpoint for this benchmark?") from None
    finally:
        model.train(was)
    logits = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"The model from {source} outputs {tuple(logits.shape[1:])} logits per input but this "
            f"benchmark has {num_classes} classes; the checkpoint does not match the benchmark.")


@dataclass
class _Extractor:
    """Runs the network over named splits once each, caching the Features on disk."""

    model: Any
    mean: Any
    std: Any
    cache: Path | None
    keep_inputs: bool = False
    batch_size: int = 512
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: list[str] = field(default_factory=list)

    def __call__(self, name: str, ds) -> Features:
        from .. import data as D
        from ..extraction import extract

        before = self._cached_files()
        t0 = time.perf_counter()
        loader = D.loader(ds, batch_size=self.batch_size, shuffle=False, mean=self.mean, std=self.std)
        f = extract(self.model, loader, keep_inputs=self.keep_inputs, cache_dir=self.cache,
                    progress=self.progress, desc=f"extract {name}")
        if f.labels is None:
            f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
        self.timings[name] = time.perf_counter() - t0
        if self.cache is not None and self._cached_files() == before:
            self.from_cache.append(name)
        return f

    def _cached_files(self) -> int:
        return len(list(self.cache.glob("features-*.npz"))) if self.cache is not None and self.cache.exists() else 0


def model_normalization(meta: dict | None, default_mean: Any, default_std: Any) -> tuple[Any, Any]:
    """The input ``(mean, std)`` a checkpoint was trained with.

    Reads ``meta["normalization"] = {"mean": ..., "std": ...}`` (what
    `oodscope.models.reference` and `oodscope.train.fit` store), else top-level
    ``meta["mean"]``/``meta["std"]``, else the given defaults.
    """
    meta = meta or {}
    norm = meta.get("normalization")
    norm = norm if isinstance(norm, dict) else {}
    mean = norm.get("mean", meta.get("mean"))
    std = norm.get("std", meta.get("std"))
    return (default_mean if mean is None else mean), (default_std if std is None else std)


def _wants_inputs(fields: Iterable[str] | None) -> bool:
    return fields is None or "inputs" in set(fields) or "model" in set(fields)


def _cap(ds, n: int | None, seed: int):
    return ds if n is None or len(ds) <= n else ds.sample(n, seed=seed)


# --------------------------------------------------------------------------- fashion-mnist
def fashion_mnist_splits(
    meta: dict | None = None,
    seed: int = 0,
    subset: int | None = None,
    ood: Iterable[str] | None = None,
    val_size: int = 5000,
    noise_size: int = 10000,
    corruption_severity: int = 3,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """The Fashion-MNIST benchmark's images: ``train``, ``val_id``, ``val_ood``, ``test_id``
    (ImageDatasets), ``far`` and ``covariate`` (name -> ImageDataset), ``notes``,
    ``descriptions``. Shared by the provider and ``benchmarks/one_pass.py``."""
    from .. import data as D
    from ..data.dataset import ImageDataset

    meta = meta or {}
    notes: list[str] = []
    train_all = D.load("fashion-mnist", "train", root=data_root)
    test = D.load("fashion-mnist", "test", root=data_root)
    rng = np.random.default_rng(seed)
    held = meta.get("val_indices")
    if held is not None:  # the model was trained without these: use them as ID-val
        val_idx = np.asarray(held, dtype=np.int64)
    else:
        val_idx = rng.permutation(len(train_all))[:val_size]
        notes.append("ID-val is a random held-out part of the train split; if the model was "
                     "trained on those images too, ID-val looks more confident than test ID.")
    mask = np.ones(len(train_all), bool)
    mask[val_idx] = False
    train = _cap(train_all.subset(np.nonzero(mask)[0], name="fashion-mnist/train-fit"), subset, seed)
    val = _cap(train_all.subset(np.sort(val_idx), name="fashion-mnist/val"), subset, seed)
    test = _cap(test, subset, seed)

    # ---- OOD sets
    wanted = None if ood is None else {o.lower() for o in ood}
    ood_sets: dict[str, Any] = {}
    descriptions: dict[str, str] = {}
    n_noise = min(noise_size, subset) if subset else noise_size
    for name in ("mnist", "kmnist", "notmnist"):
        if wanted is not None and name not in wanted:
            continue
        try:
            ood_sets[name] = _cap(D.load(name, "test", root=None), subset, seed)
            descriptions[name] = f"{name} test split (grey 28×28)"
        except (FileNotFoundError, ValueError, KeyError) as exc:
            if wanted is not None and name in wanted:
                raise
            notes.append(f"{name} skipped: its files were not found (oodscope.data.find({name!r}) "
                         f"lists where to put them): {str(exc).splitlines()[0][:120]}")
    if wanted is None or "gaussian-noise" in wanted:
        ood_sets["gaussian-noise"] = D.gaussian_noise(n_noise, (28, 28), seed=seed + 1)
        descriptions["gaussian-noise"] = "i.i.d. Gaussian pixel noise"
    if wanted is None or "uniform-noise" in wanted:
        ood_sets["uniform-noise"] = D.uniform_noise(n_noise, (28, 28), seed=seed + 2)
        descriptions["uniform-noise"] = "i.i.d. uniform pixel noise"

    # ---- covariate shift: each test image gets one corruption kind at a fixed severity
    kinds = list(D.CORRUPTIONS)
    cov = D.corrupted_dataset(test, None, severity=corruption_severity, seed=seed,
                              base_name="fashion-mnist")
    descriptions[FMNIST_COVARIATE] = (f"test split with synthetic corruptions ({', '.join(kinds)}) at "
                                      f"severity {corruption_severity}, one kind per image, labels kept")

    # ---- validation OOD: generated from held-out ID images only
    half = len(val) // 2
    vimgs = val.images
    val_ood_imgs = np.concatenate([patch_shuffle(vimgs[:half], seed=seed), box_blur(vimgs[half:], 2, 3)])
    val_ood = ImageDataset(val_ood_imgs, None, [], name="fashion-mnist/val-ood-generated")

    return {"train": train, "val_id": val, "val_ood": val_ood, "test_id": test, "far": ood_sets,
            "covariate": {FMNIST_COVARIATE: cov}, "notes": notes, "descriptions": descriptions}


def fashion_mnist(
    model: str | Path | None = None,
    subset: int | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    ood: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    val_size: int = 5000,
    noise_size: int = 10000,
    corruption_severity: int = 3,
    data_root: str | Path | None = None,
    progress: bool = True,
    net: Any = None,
    net_meta: dict | None = None,
) -> FeatureSet:
    """Fashion-MNIST as ID; see the module docstring for the splits.

    ``net``/``net_meta`` pass an in-memory model (tests, scripts) instead of a checkpoint.
    """

    if subset is None and quick:
        subset = 2000
    notes: list[str] = []
    # ---- model
    if net is not None:
        meta, source = dict(net_meta or {}), "the given network"
    elif model is not None:
        from ..models import load_checkpoint

        net, meta = load_checkpoint(model)
        meta, source = dict(meta or {}), str(model)
    else:
        from ..models import reference_model

        net, meta = reference_model("fashion-mnist", cache_dir=cache_dir, train_if_missing=True, seed=seed)
        meta, source = dict(meta or {}), "the reference CNN (oodscope.models.reference_model)"
    _check_model(net, 10, (1, 28, 28), source)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)

    sp = fashion_mnist_splits(meta, seed, subset, ood, val_size, noise_size, corruption_severity,
                              data_root)
    notes += sp["notes"]
    descriptions = sp["descriptions"]

    # ---- one pass per split
    ex = _Extractor(net, mean, std, _feature_cache(cache_dir), keep_inputs=_wants_inputs(fields),
                    progress=progress)
    fs = FeatureSet(
        train=ex("train", sp["train"]),
        val_id=ex("val_id", sp["val_id"]),
        val_ood=ex("val_ood", sp["val_ood"]),
        test_id=ex("test_id", sp["test_id"]),
        far_ood={k: ex(k, v) for k, v in sp["far"].items()},
        covariate={k: ex(k, v) for k, v in sp["covariate"].items()},
    )
    fs.info.update(
        model=source + (f" — {meta['arch'].get('name')} {meta['arch'].get('kwargs', {})}"
                        if isinstance(meta.get("arch"), dict) else ""),
        model_meta={k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))},
        val_ood_description=FMNIST_VAL_OOD,
        val_ood_reason=FMNIST_VAL_WHY,
        ood_descriptions=descriptions,
        timings=dict(ex.timings),
        timings_from_cache=list(ex.from_cache),
        notes=notes,
        normalization={"mean": mean, "std": std},
    )
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


register_benchmark(
    "fashion-mnist",
    fashion_mnist,
    "ID Fashion-MNIST (reference CNN or --model); OOD MNIST, KMNIST/notMNIST if present, "
    "noise; covariate Fashion-MNIST-C; runs offline",
    ood_names=[*FMNIST_OOD, FMNIST_COVARIATE],
)


# --------------------------------------------------------------------------- OpenOOD v1.5
@dataclass(frozen=True)
class OpenOODProtocol:
    """An OpenOOD v1.5 benchmark as data: image-list files relative to the data root."""

    name: str
    num_classes: int
    image_size: int
    images: str  # images_classic or images_largescale
    lists: dict[str, str]  # split -> image list (train, val_id, test_id, val_ood)
    near: dict[str, str]
    far: dict[str, str]
    covariate: dict[str, str] = field(default_factory=dict)
    val_ood_description: str = ""
    list_roots: dict[str, str] = field(default_factory=dict)  # set -> images folder if different

    def expected_paths(self, root: Path) -> list[Path]:
        lists = {**self.lists, **self.near, **self.far, **self.covariate}
        return [root / p for p in lists.values()]


def _cifar_protocol(name: str, other: str, num_classes: int) -> OpenOODProtocol:
    b = f"benchmark_imglist/{name}"
    return OpenOODProtocol(
        name=name, num_classes=num_classes, image_size=32, images="images_classic",
        lists={"train": f"{b}/train_{name}.txt", "val_id": f"{b}/val_{name}.txt",
               "test_id": f"{b}/test_{name}.txt", "val_ood": f"{b}/val_tin.txt"},
        near={other: f"{b}/test_{other}.txt", "tin": f"{b}/test_tin.txt"},
        far={"mnist": f"{b}/test_mnist.txt", "svhn": f"{b}/test_svhn.txt",
             "texture": f"{b}/test_texture.txt", "places365": f"{b}/test_places365.txt"},
        val_ood_description="TinyImageNet images of classes held out from the near-OOD TIN test set "
                            "(OpenOOD v1.5 val_tin list)",
    )


def _imagenet_protocol(name: str, num_classes: int) -> OpenOODProtocol:
    b, i = f"benchmark_imglist/{name}", "benchmark_imglist/imagenet"
    return OpenOODProtocol(
        name=name, num_classes=num_classes, image_size=224, images="images_largescale",
        lists={"train": f"{b}/train_{name}.txt", "val_id": f"{b}/val_{name}.txt",
               "test_id": f"{b}/test_{name}.txt", "val_ood": f"{b}/val_openimage_o.txt"},
        near={"ssb_hard": f"{i}/test_ssb_hard.txt", "ninco": f"{i}/test_ninco.txt"},
        far={"inaturalist": f"{i}/test_inaturalist.txt", "textures": f"{i}/test_textures.txt",
             "openimage_o": f"{i}/test_openimage_o.txt"},
        covariate={f"{name}_v2": f"{b}/test_{name}_v2.txt", f"{name}_c": f"{b}/test_{name}_c.txt",
                   f"{name}_r": f"{b}/test_{name}_r.txt"},
        val_ood_description="OpenImage-O validation images disjoint from the OpenImage-O test list "
                            "(OpenOOD v1.5 val_openimage_o list)",
        list_roots={"textures": "images_classic"},
    )


OPENOOD_PROTOCOLS: dict[str, OpenOODProtocol] = {
    "cifar10": _cifar_protocol("cifar10", "cifar100", 10),
    "cifar100": _cifar_protocol("cifar100", "cifar10", 100),
    "imagenet200": _imagenet_protocol("imagenet200", 200),
    "imagenet": _imagenet_protocol("imagenet", 1000),
}

#: Default detectors when an OpenOOD protocol runs with ``--vlm`` (the zero-shot ones;
#: kept equal to `oodscope.vlm.benchmark.VLM_DETECTORS`, a test checks it).
VLM_DEFAULT_DETECTORS = ("mcm", "glmcm", "neglabel", "adaneg")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _openood_root(data_root: str | Path | None) -> Path:
    import os

    if data_root is not None:
        return Path(data_root)
    env = os.environ.get("OODSCOPE_DATA")
    if env:
        return Path(env) / "openood"
    return Path.home() / ".cache" / "oodscope" / "openood"


def openood(
    protocol: str,
    model: str | Path | None = None,
    subset: int | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    ood: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
    net: Any = None,
    net_meta: dict | None = None,
    vlm: Any = None,
    class_names: Any = None,
) -> FeatureSet:
    """An OpenOOD v1.5 protocol on the user's data and model (``--model``), or, with
    ``vlm`` (``--vlm hf:<model>``), embedded with a CLIP-like model for the zero-shot
    detectors: that delegates to `oodscope.vlm.benchmark.openood_vlm` (``class_names``: the
    ID class names in label order, a list or a file with one name a line)."""
    from ..data.dataset import ImageDataset
    from ..data.formats import read_image_list

    proto = OPENOOD_PROTOCOLS[protocol]
    if vlm is not None:
        if model is not None or net is not None:
            raise ValueError(f"Benchmark {protocol!r}: pass either --model (a classifier) or --vlm "
                             "(a CLIP-like model), not both.")
        from ..vlm.benchmark import openood_vlm

        return openood_vlm(protocol, vlm=vlm, class_names=class_names, data_root=data_root,
                           subset=subset, cache_dir=cache_dir, quick=quick, seed=seed, ood=ood,
                           fields=fields, progress=progress)
    if class_names is not None:
        raise ValueError(f"Benchmark {protocol!r}: class names are only used with --vlm.")
    if net is None and model is None:
        raise ValueError(
            f"Benchmark {protocol!r} evaluates your network: pass --model path/to/checkpoint "
            "(oodscope has no pretrained weights for it), or --vlm hf:<model> for CLIP zero-shot "
            "detectors.")
    root = _openood_root(data_root)
    wanted = None if ood is None else {o.lower() for o in ood}
    needed = {**proto.lists}
    for k, v in {**proto.near, **proto.far, **proto.covariate}.items():
        if wanted is None or k in wanted or k in proto.covariate:
            needed[k] = v
    missing = [str(root / p) for p in needed.values() if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"Benchmark {protocol!r} needs the OpenOOD v1.5 image lists and images under {root} "
            f"(set OODSCOPE_DATA, whose 'openood' folder is used, or pass --data-root). Missing:\n  "
            + "\n  ".join(missing)
            + f"\nImages are expected under {root / proto.images}/ as listed in those files "
            "(OpenOOD's download script produces exactly this layout).")
    if net is None:
        from ..models import load_checkpoint

        net, meta = load_checkpoint(model)
        source = str(model)
    else:
        meta, source = dict(net_meta or {}), "the given network"
    meta = dict(meta or {})
    _check_model(net, proto.num_classes, (3, proto.image_size, proto.image_size), source)
    large = proto.image_size > 64
    mean, std = model_normalization(meta, _IMAGENET_MEAN if large else _CIFAR_MEAN,
                                    _IMAGENET_STD if large else _CIFAR_STD)
    size = (proto.image_size, proto.image_size)

    def load(key: str, rel: str):
        images_dir = root / proto.list_roots.get(key, proto.images)
        imgs, labels = read_image_list(root / rel, root=images_dir, size=size, mode="RGB", progress=progress)
        ds = ImageDataset(imgs, labels, name=f"{protocol}/{key}")
        return _cap(ds, subset, seed)

    ex = _Extractor(net, mean, std, _feature_cache(cache_dir), keep_inputs=_wants_inputs(fields),
                    batch_size=128 if large else 512, progress=progress)
    fs = FeatureSet(
        train=ex("train", load("train", proto.lists["train"])),
        val_id=ex("val_id", load("val_id", proto.lists["val_id"])),
        val_ood=ex("val_ood", load("val_ood", proto.lists["val_ood"])),
        test_id=ex("test_id", load("test_id", proto.lists["test_id"])),
        near_ood={k: ex(k, load(k, v)) for k, v in proto.near.items() if k in needed},
        far_ood={k: ex(k, load(k, v)) for k, v in proto.far.items() if k in needed},
        covariate={k: ex(k, load(k, v)) for k, v in proto.covariate.items()},
    )
    fs.info.update(
        model=source, val_ood_description=proto.val_ood_description,
        val_ood_reason="The OpenOOD v1.5 protocol: hyperparameters are chosen on this validation "
                       "OOD set, which shares no image with any test OOD set.",
        timings=dict(ex.timings), timings_from_cache=list(ex.from_cache),
        normalization={"mean": mean, "std": std},
        notes=[f"OpenOOD v1.5 protocol {protocol!r}, data from {root}"],
    )
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


def _register_openood() -> None:
    from functools import partial

    for name, proto in OPENOOD_PROTOCOLS.items():
        provider = partial(openood, name)
        provider.__signature__ = _signature_without_protocol()  # lets the runner see the options
        register_benchmark(
            name, provider,
            f"OpenOOD v1.5 {name}: near {'/'.join(proto.near)}, far {'/'.join(proto.far)}"
            + (f", covariate {'/'.join(proto.covariate)}" if proto.covariate else "")
            + "; needs --model (or --vlm) and the data",
            ood_names=[*proto.near, *proto.far, *proto.covariate],
            vlm_default_detectors=list(VLM_DEFAULT_DETECTORS),
        )


def _signature_without_protocol():
    import inspect

    sig = inspect.signature(openood)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "protocol"])


_register_openood()
