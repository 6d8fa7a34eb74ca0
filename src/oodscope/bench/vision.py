"""The builders of the image-classifier benchmarks (their specs are in `oodscope.bench.catalog`).

Each runs the network once per split (cached on disk by model and data) and returns a
`FeatureSet`; the runner does everything else from cached Features.

* ``fashion-mnist``: ID Fashion-MNIST. The train split minus a held-out part fits the
  detectors, the held-out part is ID-val, the test split is test ID. Test OOD (far): MNIST,
  KMNIST and notMNIST when their files are present (skipped with a note otherwise),
  Gaussian and uniform noise. Covariate shift: Fashion-MNIST-C style corruptions of the
  test split. Validation OOD: outliers generated from held-out ID images
  (`oodscope.data.generated_outliers`) — a source that is none of the test OOD sets.
* ``cifar10``, ``cifar100``, ``imagenet200``, ``imagenet``: the OpenOOD v1.5 splits defined
  by its image-list files (`oodscope.bench.openood`); they need ``--model`` and the data.
* ``ascood-*``: ASCOOD's spurious and fine-grained image-list protocols, read by the same
  builder (`oodscope.bench.openood`).
* ``images``: your image folders (``--id`` with one sub-folder per class, ``--ood`` folders)
  and your checkpoint; `split_id_folder` and `image_folder_splits` are shared with the
  PT-OOD and NOVA builders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .extract import ImageExtractor, check_model, load_network, model_normalization
from .layers import plan_for_options
from .openood import LIST_PROTOCOLS, openood_root
from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["FMNIST_MEAN", "FMNIST_STD", "build_fashion_mnist", "build_image_folders", "build_openood",
           "fashion_mnist_splits", "check_folder_params", "image_folder_splits",
           "image_read_options", "imagenet_normalization", "input_shape", "split_id_folder"]

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_COVARIATE = "fashion-mnist-c"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _feature_set(ex: ImageExtractor, sets: dict[str, Any], near: dict[str, Any] | None = None,
                 far: dict[str, Any] | None = None, covariate: dict[str, Any] | None = None) -> FeatureSet:
    """One pass of ``ex`` over every split, in the order train, val, val-OOD, test, OOD sets."""
    return FeatureSet(
        train=ex("train", sets["train"]), val_id=ex("val_id", sets["val_id"]),
        val_ood=ex("val_ood", sets["val_ood"]), test_id=ex("test_id", sets["test_id"]),
        near_ood={k: ex(k, v) for k, v in (near or {}).items()},
        far_ood={k: ex(k, v) for k, v in (far or {}).items()},
        covariate={k: ex(k, v) for k, v in (covariate or {}).items()},
    )


def _describe(meta: dict, source: str) -> str:
    arch = meta.get("arch")
    return source + (f" — {arch.get('name')} {arch.get('kwargs', {})}" if isinstance(arch, dict) else "")


def _val_ood(val: Any, seed: int, name: str):
    from ..data import ImageDataset, generated_outliers

    return ImageDataset(generated_outliers(val.images, seed), None, [], name=name)


# --------------------------------------------------------------------------- fashion-mnist
def fashion_mnist_splits(options: ProviderOptions, meta: dict | None = None, val_size: int = 5000,
                         noise_size: int = 10000, corruption_severity: int = 3) -> dict[str, Any]:
    """The Fashion-MNIST benchmark's images: ``train``, ``val_id``, ``val_ood``, ``test_id``
    (ImageDatasets), ``far`` and ``covariate`` (name -> ImageDataset), ``notes``,
    ``descriptions``. ``meta["val_indices"]`` (a checkpoint's held-out training images)
    become ID-val. Shared by the builder and ``benchmarks/one_pass.py``."""
    from .. import data as D

    meta = meta or {}
    seed, subset = options.seed, options.subset
    notes: list[str] = []
    train_all = D.load("fashion-mnist", "train", root=options.data_root)
    test = D.load("fashion-mnist", "test", root=options.data_root)
    held = meta.get("val_indices")
    if held is not None:  # the model was trained without these: use them as ID-val
        val_idx = np.asarray(held, dtype=np.int64)
    else:
        val_idx = np.random.default_rng(seed).permutation(len(train_all))[:val_size]
        notes.append("ID-val is a random held-out part of the train split; if the model was "
                     "trained on those images too, ID-val looks more confident than test ID.")
    mask = np.ones(len(train_all), bool)
    mask[val_idx] = False
    train = options.cap(train_all.subset(np.nonzero(mask)[0], name="fashion-mnist/train-fit"))
    val = options.cap(train_all.subset(np.sort(val_idx), name="fashion-mnist/val"))
    test = options.cap(test)

    far: dict[str, Any] = {}
    descriptions: dict[str, str] = {}
    for name in ("mnist", "kmnist", "notmnist"):
        if not options.wants(name):
            continue
        try:
            far[name] = options.cap(D.load(name, "test", root=None))
            descriptions[name] = f"{name} test split (grey 28×28)"
        except (FileNotFoundError, ValueError, KeyError) as exc:
            if options.ood is not None:
                raise
            notes.append(f"{name} skipped: its files were not found (oodscope.data.find({name!r}) "
                         f"lists where to put them): {str(exc).splitlines()[0][:120]}")
    n_noise = min(noise_size, subset) if subset else noise_size
    for k, (make, what, offset) in {"gaussian-noise": (D.gaussian_noise, "Gaussian", 1),
                                    "uniform-noise": (D.uniform_noise, "uniform", 2)}.items():
        if options.wants(k):
            far[k] = make(n_noise, (28, 28), seed=seed + offset)
            descriptions[k] = f"i.i.d. {what} pixel noise"

    # covariate shift: each test image gets one corruption kind at a fixed severity
    cov = D.corrupted_dataset(test, None, severity=corruption_severity, seed=seed, base_name="fashion-mnist")
    descriptions[FMNIST_COVARIATE] = (f"test split with synthetic corruptions ({', '.join(D.CORRUPTIONS)}) at "
                                      f"severity {corruption_severity}, one kind per image, labels kept")
    return {"train": train, "val_id": val, "val_ood": _val_ood(val, seed, "fashion-mnist/val-ood-generated"),
            "test_id": test, "far": far, "covariate": {FMNIST_COVARIATE: cov}, "notes": notes,
            "descriptions": descriptions}


def _reference_network(options: ProviderOptions):
    from ..train import reference_model

    net, meta = reference_model("fashion-mnist", cache_dir=options.cache_dir, train_if_missing=True,
                                seed=options.seed)
    return net, dict(meta or {}), "the reference CNN (oodscope.train.reference_model)"


def build_fashion_mnist(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """Fashion-MNIST as ID; see the module docstring for the splits."""
    net, meta, source = load_network(options, lambda: _reference_network(options), spec.name)
    check_model(net, 10, (1, 28, 28), source)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)
    sp = fashion_mnist_splits(options, meta, **spec.params)
    layer_kwargs, layers = plan_for_options(net, (1, 28, 28), options)
    ex = ImageExtractor(net, mean, std, options, layers=layers)
    fs = _feature_set(ex, sp, far=sp["far"], covariate=sp["covariate"])
    fs.info.update(
        model=_describe(meta, source),
        model_meta={k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))},
        ood_descriptions=sp["descriptions"], notes=sp["notes"], normalization={"mean": mean, "std": std},
        extra_layers=layers, **ex.info(),
    )
    fs.detector_kwargs.update(layer_kwargs)
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


# --------------------------------------------------------------------------- OpenOOD v1.5
def build_openood(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """An image-list protocol (``spec.params["protocol"]``: OpenOOD v1.5 or ASCOOD) on the user's
    data and model."""
    from ..data.dataset import ImageDataset
    from ..data.formats import read_image_list

    proto = LIST_PROTOCOLS[spec.params["protocol"]]
    if options.net is None and options.model is None:
        raise ValueError(
            f"Benchmark {spec.name!r} evaluates your network: pass --model path/to/checkpoint "
            "(oodscope has no pretrained weights for it), or --vlm hf:<model> for CLIP zero-shot "
            "detectors.")
    needed = proto.needed(options.wants)
    root = openood_root(options.data_root, needed, spec.name, proto)
    net, meta, source = load_network(options, benchmark=spec.name)
    check_model(net, proto.num_classes, (3, proto.image_size, proto.image_size), source)
    large = proto.image_size > 64
    mean, std = model_normalization(meta, _IMAGENET_MEAN if large else _CIFAR_MEAN,
                                    _IMAGENET_STD if large else _CIFAR_STD)

    def load(key: str) -> ImageDataset:
        imgs, labels = read_image_list(root / needed[key], root=proto.images_dir(root, key),
                                       size=(proto.image_size,) * 2, mode="RGB", progress=options.progress)
        return options.cap(ImageDataset(imgs, labels, name=f"{proto.name}/{key}"))

    layer_kwargs, layers = plan_for_options(net, (3, proto.image_size, proto.image_size), options)
    ex = ImageExtractor(net, mean, std, options, batch_size=128 if large else 512, layers=layers)
    fs = _feature_set(ex, {k: load(k) for k in proto.lists},
                      near={k: load(k) for k in proto.near if k in needed},
                      far={k: load(k) for k in proto.far if k in needed},
                      covariate={k: load(k) for k in proto.covariate})
    fs.info.update(model=source, normalization={"mean": mean, "std": std}, extra_layers=layers,
                   notes=[f"{proto.source} protocol {proto.name!r}, data from {root}"], **ex.info())
    fs.detector_kwargs.update(layer_kwargs)
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


# --------------------------------------------------------------------------- image folders
def image_read_options(image_shape: tuple[int, ...], progress: bool) -> dict[str, Any]:
    """Keyword arguments of the image readers for a network input of ``(channels, height, width)``:
    resized to that size, read as grey (1 channel) or RGB (3)."""
    channels, h, w = image_shape
    return dict(size=(w, h), mode="L" if channels == 1 else "RGB", progress=progress)


def split_id_folder(id_dir: Any, options: ProviderOptions, image_shape: tuple[int, ...], val_fraction: float,
                    test_fraction: float, name: str = "images", option: str = "--id") -> dict[str, Any]:
    """An ID folder (one sub-folder per class) cut, stratified and seeded, into ``train`` /
    ``val_id`` / ``test_id``, with ``val_ood`` generated from the ID-val images and the
    ``classes``; evaluation splits capped by ``options.subset``."""
    from ..data import holdout_split, load_image_folder

    if id_dir is None or not Path(id_dir).is_dir():
        raise ValueError(f"{option} DIR must be a folder with one sub-folder of images per class; got {id_dir!r}.")
    ids = load_image_folder(id_dir, **image_read_options(image_shape, options.progress))
    if ids.labels is None or len(ids.classes) < 2:
        raise ValueError(f"{id_dir}: the ID folder needs at least two class sub-folders.")
    n_test = max(1, round(test_fraction * len(ids)))
    n_val = max(2, round(val_fraction * len(ids)))
    if len(ids) - n_test - n_val < len(ids.classes):
        raise ValueError(f"{id_dir} has {len(ids)} images: too few to split into train, ID-val and test.")
    rest, test_idx = holdout_split(ids.labels, n_test, options.seed)
    fit_pos, val_pos = holdout_split(ids.labels[rest], n_val, options.seed + 1)
    val = options.cap(ids.subset(rest[val_pos], name=f"{name}/val"))
    return {"train": ids.subset(rest[fit_pos], name=f"{name}/train"), "val_id": val,
            "test_id": options.cap(ids.subset(test_idx, name=f"{name}/test")),
            "val_ood": _val_ood(val, options.seed, f"{name}/val-ood-generated"), "classes": list(ids.classes)}


def check_folder_params(spec: BenchmarkSpec) -> None:
    """``--id DIR`` is a folder and at least one ``--ood`` / ``--near`` folder is given and exists
    (checked before a network is loaded)."""
    p = spec.params
    if p.get("id_dir") is None or not Path(p["id_dir"]).is_dir():
        raise ValueError(f"bench {spec.name} needs --id DIR, a folder with one sub-folder of images per class; "
                         f"got {p.get('id_dir')!r}.")
    if not p.get("ood_dirs") and not p.get("near_dirs"):
        raise ValueError(f"bench {spec.name} needs at least one --ood DIR (a folder of OOD images).")
    absent = [str(d) for d in (*(p.get("near_dirs") or ()), *(p.get("ood_dirs") or ())) if not Path(d).is_dir()]
    if absent:
        raise FileNotFoundError(f"bench {spec.name}: these OOD folders do not exist: {', '.join(absent)}.")


def image_folder_splits(spec: BenchmarkSpec, options: ProviderOptions, image_shape: tuple[int, ...]
                        ) -> dict[str, Any]:
    """``--id DIR`` (one sub-folder per class) cut, stratified and seeded, into train /
    ID-val / test ID; every ``--ood DIR`` (far) and ``--near DIR`` (near) as a test set;
    validation OOD generated from ID-val images. Images are resized to ``image_shape``
    (channels, height, width) and read as grey (1 channel) or RGB (3)."""
    from ..data import load_image_folder

    check_folder_params(spec)
    p = spec.params
    sets = split_id_folder(p["id_dir"], options, image_shape, p["val_fraction"], p["test_fraction"])
    groups: dict[str, dict[str, Any]] = {"near": {}, "far": {}}
    for group, key in (("near", "near_dirs"), ("far", "ood_dirs")):
        for d in p.get(key) or ():
            name = Path(d).name
            if name in groups["near"] or name in groups["far"]:
                raise ValueError(f"Two OOD folders are named {name!r}; give each OOD set its own folder name.")
            if options.wants(name):
                groups[group][name] = options.cap(load_image_folder(d, **image_read_options(image_shape,
                                                                                           options.progress)))
    return {**sets, **groups}


def imagenet_normalization(channels: int) -> tuple[Any, Any]:
    """ImageNet's channel mean / std (for a grey network: their averages), the default of
    benchmarks whose networks are ImageNet-style backbones."""
    if channels == 1:
        return float(np.mean(_IMAGENET_MEAN)), float(np.mean(_IMAGENET_STD))
    return _IMAGENET_MEAN, _IMAGENET_STD


_PROBE_SHAPES = ((1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 224, 224))


def input_shape(net: Any, meta: dict, source: str) -> tuple[int, int, int]:
    """(channels, height, width) the network takes: from the checkpoint's metadata
    (``image_shape`` as `oodscope.train` stores it, or the architecture's ``in_channels`` and
    ``image_size``), else the first of `_PROBE_SHAPES` it runs on (a TorchScript file)."""
    import torch

    kwargs = (meta.get("arch") or {}).get("kwargs", {})
    shape = meta.get("image_shape")
    if shape and len(shape) in (2, 3):
        return (int(shape[2]) if len(shape) == 3 else 1, int(shape[0]), int(shape[1]))
    if "in_channels" in kwargs:
        c = int(kwargs["in_channels"])
        side = int(kwargs.get("image_size", 28 if c == 1 else 32))
        return (c, side, side)
    for candidate in _PROBE_SHAPES:
        try:
            with torch.no_grad():
                net.eval()(torch.zeros((2, *candidate)))
            return candidate
        except Exception:  # noqa: BLE001 - the network refuses this shape; try the next one
            continue
    raise ValueError(f"Cannot tell which image size the model from {source} takes (tried "
                     f"{list(_PROBE_SHAPES)}); save it with oodscope.models.save_checkpoint.")


def build_image_folders(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """``bench images``: your image folders and checkpoint (`image_folder_splits`)."""
    check_folder_params(spec)
    net, meta, source = load_network(options, benchmark=spec.name)
    shape = input_shape(net, meta, source)
    sp = image_folder_splits(spec, options, shape)
    check_model(net, len(sp["classes"]), shape, source)
    mean, std = model_normalization(meta, 0.5, 0.25)
    layer_kwargs, layers = plan_for_options(net, shape, options)
    ex = ImageExtractor(net, mean, std, options, layers=layers)
    fs = _feature_set(ex, sp, near=sp["near"], far=sp["far"])
    fs.info.update(model=_describe(meta, source), normalization={"mean": mean, "std": std}, extra_layers=layers,
                   notes=[f"ID classes from {spec.params['id_dir']}: {', '.join(sp['classes'])}"], **ex.info())
    fs.detector_kwargs.update(layer_kwargs)
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs
