"""Fine-grained near-OOD benchmark: Fashion-MNIST split by class (the builder; the specs are in
`oodscope.bench.catalog`).

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
from typing import Any

import numpy as np

from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["SPLITS", "FMNIST_CLASSES", "ClassSplitData", "split_datasets", "build_class_split",
           "class_split_features", "NEAR_NAME", "FAR_NAME", "TEST_OOD_SOURCES", "SPLIT_RECIPE"]

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


def split_datasets(split: int, options: ProviderOptions, val_size: int = 3000, train_size: int | None = None,
                   val_indices: Any = None) -> ClassSplitData:
    """Load Fashion-MNIST (and MNIST) and cut them into the sets of ``split``.

    ``options.subset`` caps every evaluation split; ``train_size`` caps the training set
    (class-stratified random draw, for short CPU runs). The ID-val part is drawn with
    ``options.seed`` and excluded from training, unless ``val_indices`` (indices into the
    Fashion-MNIST train split that the model was trained without, a checkpoint's
    ``meta["val_indices"]``) is given: then its ID-class images are ID-val and the rest of
    the ID-class images the fitting set, as in the ``fashion-mnist`` benchmark.
    """
    from .. import data as D
    from ..data.dataset import ImageDataset

    held = _check_split(split)
    id_classes = [c for c in range(10) if c not in held]
    remap = -np.ones(10, dtype=np.int64)
    remap[id_classes] = np.arange(len(id_classes))
    names = [FMNIST_CLASSES[c] for c in id_classes]

    train_all = D.load("fashion-mnist", "train", root=options.data_root)
    test = D.load("fashion-mnist", "test", root=options.data_root)
    rng = np.random.default_rng(options.seed)

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

    test_id_idx = np.nonzero(np.isin(test.labels, id_classes))[0]
    near_idx = np.nonzero(np.isin(test.labels, held))[0]
    test_id = options.cap(id_part(test, test_id_idx, f"fashion-mnist-split{split}/test"))
    near = options.cap(ImageDataset(test.images[near_idx], -np.ones(len(near_idx), np.int64), [],
                                    name=f"fashion-mnist-split{split}/{NEAR_NAME}",
                                    meta={"classes": [FMNIST_CLASSES[c] for c in held]}))
    far = options.cap(D.load("mnist", "test", root=None))
    val = options.cap(val)
    val_ood = ImageDataset(D.generated_outliers(val.images, options.seed), -np.ones(len(val), np.int64), [],
                           name=f"fashion-mnist-split{split}/val-ood-generated")
    return ClassSplitData(int(split), id_classes, list(held), train, val, val_ood, test_id, near, far, names)


def build_class_split(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """Features of every split of Fashion-MNIST class split ``spec.params["split"]``.

    The network is ``options.net`` (in memory), the ``options.model`` checkpoint, or else a
    small CNN trained here with cross-entropy on the ID classes (``epochs`` epochs, a spec
    parameter, default 4; cached under the cache folder).
    """
    from .extract import load_network

    params = dict(spec.params)
    split, epochs = params.pop("split"), params.pop("epochs", 4)
    net, meta, source = None, {}, ""
    if options.net is not None or options.model is not None:
        net, meta, source = load_network(options, benchmark=spec.name)
    # a checkpoint that records the training images it held out gets them as ID-val
    data = split_datasets(split, options, val_indices=meta.get("val_indices"), **params)
    if net is None:
        net, meta = _reference_split_model(data, options, epochs)
        source = f"small CNN trained with cross-entropy on split {data.split} ({epochs} epochs)"
    return class_split_features(data, net, meta, source, options)


def class_split_features(data: ClassSplitData, net: Any, meta: dict, source: str,
                         options: ProviderOptions) -> FeatureSet:
    """One pass of ``net`` over the sets of ``data`` (`split_datasets`)."""
    from .extract import ImageExtractor, check_model, model_normalization
    from .vision import FMNIST_MEAN, FMNIST_STD

    check_model(net, len(data.id_classes), (1, 28, 28), source)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)
    ex = ImageExtractor(net, mean, std, options)
    fs = FeatureSet(
        train=ex("train", data.train), val_id=ex("val_id", data.val), val_ood=ex("val_ood", data.val_ood),
        test_id=ex("test_id", data.test_id),
        near_ood={NEAR_NAME: ex(NEAR_NAME, data.near_ood)} if options.wants(NEAR_NAME) else {},
        far_ood={FAR_NAME: ex(FAR_NAME, data.far_ood)} if options.wants(FAR_NAME) else {},
    )
    fs.info.update(
        model=source,
        split=data.split,
        id_classes=[FMNIST_CLASSES[c] for c in data.id_classes],
        held_out_classes=[FMNIST_CLASSES[c] for c in data.held_out],
        ood_descriptions={NEAR_NAME: "test images of the held-out classes "
                                     f"({', '.join(FMNIST_CLASSES[c] for c in data.held_out)})",
                          FAR_NAME: "MNIST test split"},
        test_ood_sources=dict(TEST_OOD_SOURCES),
        normalization={"mean": mean, "std": std},
        **ex.info(),
    )
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs


def _reference_split_model(data: ClassSplitData, options: ProviderOptions, epochs: int):
    """Train (or reuse from the cache) a cross-entropy small CNN on the split's ID classes."""
    import torch

    from ..models import create, load_checkpoint, save_checkpoint
    from ..train import fit
    from .vision import FMNIST_MEAN, FMNIST_STD

    seed = options.seed
    path = options.cache("models") / (f"fashion-mnist-split{data.split}-ce-seed{seed}-e{epochs}"
                                      f"-n{len(data.train)}.safetensors")
    if path.exists():
        return load_checkpoint(path)
    torch.manual_seed(seed)
    net = create("small_cnn", num_classes=len(data.id_classes), in_channels=1)
    net, history = fit(net, data.train, epochs=epochs, seed=seed, progress=options.progress, **SPLIT_RECIPE,
                       mean=FMNIST_MEAN, std=FMNIST_STD)
    meta = {"name": f"small_cnn-ce-split{data.split}", "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
            "epochs": epochs, "recipe": SPLIT_RECIPE, "split": data.split, "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, path, meta=meta)
    return net, meta
