"""Fine-grained near-OOD benchmark: Fashion-MNIST split by class.

Six Fashion-MNIST classes are in-distribution; the other four, held out from training, are
the near-OOD test set (garments that look like the ID ones: a shirt next to a T-shirt and a
coat, a sneaker next to a sandal and an ankle boot). MNIST is the far-OOD set. The splits
are fixed (``SPLITS``) so that numbers are comparable across runs; ``split=`` picks one.

* train: the ID classes of the train split minus a held-out part (ID-val);
* val_ood: generated from ID-val images only (patch-shuffled and heavily blurred), never
  from the held-out classes, which are the test set — hyperparameters chosen on it cannot
  have seen the near-OOD classes;
* test ID: the ID classes of the test split; near OOD ``held-out-classes``: the held-out
  classes of the test split; far OOD ``mnist``: the MNIST test split.

``info["test_ood_sources"]`` maps every test OOD set to the dataset it comes from, for
`oodscope.train.outliers.check_no_leak`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .spec import FeatureSet, register_benchmark

__all__ = ["SPLITS", "FMNIST_CLASSES", "ClassSplitData", "split_datasets", "fashion_mnist_split",
           "NEAR_NAME", "FAR_NAME", "TEST_OOD_SOURCES", "SPLIT_RECIPE"]

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
#: held-out (near-OOD) Fashion-MNIST class indices of each fixed split
SPLITS: tuple[tuple[int, ...], ...] = (
    (2, 6, 7, 8),  # pullover, shirt, sneaker, bag   | ID: T-shirt, trouser, dress, coat, sandal, boot
    (0, 4, 5, 8),  # T-shirt, coat, sandal, bag       | ID: trouser, pullover, dress, shirt, sneaker, boot
    (1, 3, 6, 9),  # trouser, dress, shirt, boot      | ID: T-shirt, pullover, coat, sandal, sneaker, bag
)
NEAR_NAME = "held-out-classes"
FAR_NAME = "mnist"
TEST_OOD_SOURCES = {NEAR_NAME: "fashion-mnist", FAR_NAME: "mnist"}
#: training recipe of the split models (the reference Fashion-MNIST recipe, fewer classes)
SPLIT_RECIPE = {"batch_size": 128, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine"}
VAL_OOD_DESCRIPTION = (
    "Generated from ID-val images of the ID classes only: half patch-shuffled (4×4 grid), half "
    "heavily blurred. The held-out classes (the near-OOD test set) are never seen when choosing "
    "hyperparameters."
)


@dataclass
class ClassSplitData:
    """The image sets of one split (labels of ID sets remapped to 0..5)."""

    split: int
    id_classes: list[int]
    held_out: list[int]
    train: Any
    val: Any
    val_ood: Any
    test_id: Any
    near_ood: Any
    far_ood: Any
    class_names: list[str]


def _check_split(split: int) -> tuple[int, ...]:
    if not isinstance(split, (int, np.integer)) or not 0 <= int(split) < len(SPLITS):
        raise ValueError(f"split must be an integer in [0, {len(SPLITS) - 1}], got {split!r}.")
    return SPLITS[int(split)]


def split_datasets(split: int = 0, seed: int = 0, val_size: int = 3000, subset: int | None = None,
                   data_root: str | Path | None = None, train_size: int | None = None,
                   val_indices: Any = None) -> ClassSplitData:
    """Load Fashion-MNIST (and MNIST) and cut them into the sets of ``split``.

    ``subset`` caps every evaluation split; ``train_size`` caps the training set
    (class-stratified random draw, for short CPU runs). The ID-val part is drawn with
    ``seed`` and excluded from training, unless ``val_indices`` (indices into the
    Fashion-MNIST train split that the model was trained without, a checkpoint's
    ``meta["val_indices"]``) is given: then its ID-class images are ID-val and the rest of
    the ID-class images the fitting set, as in the ``fashion-mnist`` benchmark.
    """
    from .. import data as D
    from ..data.dataset import ImageDataset
    from .vision import box_blur, patch_shuffle

    held = _check_split(split)
    id_classes = [c for c in range(10) if c not in held]
    remap = -np.ones(10, dtype=np.int64)
    remap[id_classes] = np.arange(len(id_classes))
    names = [FMNIST_CLASSES[c] for c in id_classes]

    train_all = D.load("fashion-mnist", "train", root=data_root)
    test = D.load("fashion-mnist", "test", root=data_root)
    rng = np.random.default_rng(seed)

    def id_part(ds, idx, name):
        return ImageDataset(ds.images[idx], remap[ds.labels[idx]], names, name=name,
                            meta={"split": int(split), "id_classes": id_classes})

    id_idx = np.nonzero(np.isin(train_all.labels, id_classes))[0]
    if val_indices is not None:
        held_mask = np.zeros(len(train_all), bool)
        held_mask[np.asarray(val_indices, dtype=np.int64)] = True
        val_idx, fit_idx = id_idx[held_mask[id_idx]], id_idx[~held_mask[id_idx]]
        if len(val_idx) == 0:
            raise ValueError("val_indices holds no image of this split's ID classes; "
                             "ID-val would be empty.")
    else:
        perm = rng.permutation(id_idx)
        val_idx, fit_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    if train_size is not None and train_size < len(fit_idx):
        fit_idx = np.sort(rng.choice(fit_idx, size=train_size, replace=False))
    train = id_part(train_all, fit_idx, f"fashion-mnist-split{split}/train")
    val = id_part(train_all, val_idx, f"fashion-mnist-split{split}/val")

    def cap(ds):
        return ds if subset is None or len(ds) <= subset else ds.sample(subset, seed=seed)

    test_id_idx = np.nonzero(np.isin(test.labels, id_classes))[0]
    near_idx = np.nonzero(np.isin(test.labels, held))[0]
    test_id = cap(id_part(test, test_id_idx, f"fashion-mnist-split{split}/test"))
    near = cap(ImageDataset(test.images[near_idx], -np.ones(len(near_idx), np.int64), [],
                            name=f"fashion-mnist-split{split}/{NEAR_NAME}",
                            meta={"classes": [FMNIST_CLASSES[c] for c in held]}))
    far = cap(D.load("mnist", "test", root=None))
    val = cap(val)
    half = len(val) // 2
    val_ood = ImageDataset(
        np.concatenate([patch_shuffle(val.images[:half], seed=seed), box_blur(val.images[half:], 2, 3)]),
        -np.ones(len(val), np.int64), [], name=f"fashion-mnist-split{split}/val-ood-generated")
    return ClassSplitData(int(split), id_classes, list(held), train, val, val_ood, test_id, near, far, names)


def fashion_mnist_split(
    split: int = 0,
    model: str | Path | None = None,
    subset: int | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    ood: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    val_size: int = 3000,
    data_root: str | Path | None = None,
    progress: bool = True,
    net: Any = None,
    net_meta: dict | None = None,
    data: ClassSplitData | None = None,
    epochs: int = 4,
    train_size: int | None = None,
) -> FeatureSet:
    """Features of every split of Fashion-MNIST class split ``split`` (see the module docs).

    The network is ``net`` (in memory), the checkpoint ``model``, or else a small CNN trained
    here with cross-entropy on the ID classes (``epochs`` epochs; cached under ``cache_dir``).
    ``data`` passes ready `split_datasets` output (the comparison of training methods trains
    on exactly those images).
    """
    from .vision import (FMNIST_MEAN, FMNIST_STD, _check_model, _Extractor, _feature_cache, _wants_inputs,
                         model_normalization)

    if subset is None and quick:
        subset = 2000
    meta: dict = {}
    if net is not None:
        meta, source = dict(net_meta or {}), "the given network"
    elif model is not None:
        from ..models import load_checkpoint

        net, meta = load_checkpoint(model)
        meta, source = dict(meta or {}), str(model)
    if data is None:
        # a checkpoint that records the training images it held out gets them as ID-val
        data = split_datasets(split, seed=seed, val_size=val_size, subset=subset, data_root=data_root,
                              train_size=train_size, val_indices=meta.get("val_indices"))
    n_cls = len(data.id_classes)
    if net is None:
        net, meta = _reference_split_model(data, cache_dir, seed, epochs, progress)
        source = f"small CNN trained with cross-entropy on split {data.split} ({epochs} epochs)"
    _check_model(net, n_cls, (1, 28, 28), source)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)

    wanted = None if ood is None else {o.lower() for o in ood}
    ex = _Extractor(net, mean, std, _feature_cache(cache_dir), keep_inputs=_wants_inputs(fields),
                    progress=progress)
    near = {NEAR_NAME: ex(NEAR_NAME, data.near_ood)} if wanted is None or NEAR_NAME in wanted else {}
    far = {FAR_NAME: ex(FAR_NAME, data.far_ood)} if wanted is None or FAR_NAME in wanted else {}
    fs = FeatureSet(
        train=ex("train", data.train),
        val_id=ex("val_id", data.val),
        val_ood=ex("val_ood", data.val_ood),
        test_id=ex("test_id", data.test_id),
        near_ood=near,
        far_ood=far,
    )
    fs.info.update(
        model=source,
        split=data.split,
        id_classes=[FMNIST_CLASSES[c] for c in data.id_classes],
        held_out_classes=[FMNIST_CLASSES[c] for c in data.held_out],
        val_ood_description=VAL_OOD_DESCRIPTION,
        val_ood_reason="The held-out classes are the near-OOD test set, so validation outliers are "
                       "generated from ID images instead.",
        ood_descriptions={NEAR_NAME: "test images of the held-out classes "
                                     f"({', '.join(FMNIST_CLASSES[c] for c in data.held_out)})",
                          FAR_NAME: "MNIST test split"},
        test_ood_sources=dict(TEST_OOD_SOURCES),
        timings=dict(ex.timings),
        normalization={"mean": mean, "std": std},
    )
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


def _reference_split_model(data: ClassSplitData, cache_dir, seed: int, epochs: int, progress: bool):
    """Train (or reuse from the cache) a cross-entropy small CNN on the split's ID classes."""
    import torch

    from ..models import create, load_checkpoint, save_checkpoint
    from ..train import fit
    from .vision import FMNIST_MEAN, FMNIST_STD

    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "oodscope"
    path = base / "models" / f"fashion-mnist-split{data.split}-ce-seed{seed}-e{epochs}-n{len(data.train)}.safetensors"
    if path.exists():
        return load_checkpoint(path)
    torch.manual_seed(seed)
    net = create("small_cnn", num_classes=len(data.id_classes), in_channels=1)
    net, history = fit(net, data.train, epochs=epochs, seed=seed, progress=progress, **SPLIT_RECIPE,
                       mean=FMNIST_MEAN, std=FMNIST_STD)
    meta = {"name": f"small_cnn-ce-split{data.split}", "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
            "epochs": epochs, "recipe": SPLIT_RECIPE, "split": data.split, "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, path, meta=meta)
    return net, meta


register_benchmark(
    "fashion-mnist-split",
    fashion_mnist_split,
    "Fine-grained near-OOD: 6 Fashion-MNIST classes ID, the other 4 held out as near-OOD "
    "(fixed splits, split=0..2); far OOD MNIST; validation OOD generated from ID images",
    ood_names=[NEAR_NAME, FAR_NAME],
)


def _register_numbered_splits() -> None:
    """``fashion-mnist-split1``, ``-split2``...: the other fixed splits, reachable from the CLI."""
    import functools
    import inspect

    sig = inspect.signature(fashion_mnist_split)
    params = [p for n, p in sig.parameters.items() if n != "split"]
    for k in range(len(SPLITS)):
        provider = functools.partial(fashion_mnist_split, k)
        provider.__signature__ = sig.replace(parameters=params)
        held = ", ".join(FMNIST_CLASSES[c] for c in SPLITS[k])
        register_benchmark(f"fashion-mnist-split{k}", provider,
                           f"Fashion-MNIST class split {k}: near-OOD = held-out {held}; far OOD MNIST",
                           ood_names=[NEAR_NAME, FAR_NAME])


_register_numbered_splits()
