"""MetaCoCo animals with spurious backgrounds: leave-two-classes-out OOD, optionally few-shot.

MetaCoCo (Zhang, Li, Wu, Kuang, "MetaCoCo: A New Few-Shot Classification Benchmark with
Spurious Correlation", ICLR 2024) labels every image with a concept (the class) and a context
(e.g. the background), so that training and test contexts can differ. Its authors' repository
is not in the source index this was written with, so its own file layout could not be read.
The OOD protocol implemented here is the one SPROD ("Spurious-Aware Prototype Refinement for
Reliable OOD Detection", NeurIPS 2025 submission) builds on MetaCoCo's animal images, read from
github.com/anonymouss-neurips2025/SPROD at commit ab793640912f29a87ecc736026dba093c4316a33
(``openood/datasets/animals_metacoco_dataset.py`` and the ``animals_metacoco`` branch of
``openood/evaluation_api/datasets.py``; the class grouping from its ERM training script):

* data: ``animals_metadata.csv`` with columns ``Id, address, class, attribute, split``
  (``attribute`` = the context, ``split`` 0 / 1 / 2 = train / val / test); image files at
  ``address`` (relative to the CSV's folder unless absolute: SPROD reads precomputed
  embeddings keyed by ``Id``, so how ``address`` is rooted is our assumption).
* 26 animal classes; split ``k`` holds out the ``k``-th pair of the sorted class names
  (``sorted(classes)[2k : 2k + 2]``, k = 0 .. 12) and keeps the other 24 as ID, whose
  network outputs are the sorted ID class names.
* ID train / ID-val / test ID = rows of ID classes with split 0 / 1 / 2. Few-shot
  (``shots``): per ID class, in order of first appearance, ``DataFrame.sample(n=min(shots,
  rows), random_state=seed)`` of its training rows, as SPROD's ``low_shot`` does.
* near OOD ``animals_ood``: every row of the two held-out classes (any split), permuted with
  ``numpy.random.seed(seed); permutation(n)``; the first ``int(0.1 n)`` are the validation
  OOD set (SPROD's ``ood_val_source='sp'``), the rest the test set, so tuning never sees a
  test image.
* the model: SPROD evaluates frozen pre-trained backbones with a linear classifier trained on
  the ID embeddings; by default (``linear_probe=True``) ``--model`` is such a backbone and a
  linear probe is fitted on the ID training features (`oodscope.bench.ptood.probe_feature_set`).
  With ``linear_probe=False`` the checkpoint must be a classifier of the 24 ID classes.

Left out: SPROD's far OOD sets (SVHN, iSUN, LSUN-resize) come as precomputed embeddings in
its pipeline; here only the spurious near-OOD set is evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["ANIMAL_CLASSES", "METACOCO_SPLITS", "build_metacoco", "metacoco_class_split", "metacoco_splits"]

#: the 26 animal classes of SPROD's AnimalsMetaCoCo, sorted (its ``ood_class_list``)
ANIMAL_CLASSES = tuple(sorted([
    "cat", "cow", "dog", "dolphin", "elephant", "fox", "frog", "giraffe", "goose", "horse", "lion", "monkey",
    "owl", "rabbit", "rat", "seal", "sheep", "squirrel", "tiger", "wolf", "bear", "kangaroo", "lizard",
    "ostrich", "tortoise", "crab"]))
METACOCO_SPLITS = len(ANIMAL_CLASSES) // 2
METADATA = "animals_metadata.csv"
_COLUMNS = ("Id", "address", "class", "attribute", "split")
_HOW_TO_GET = (
    f"Expected: {METADATA} (columns {', '.join(_COLUMNS)}; split 0/1/2 = train/val/test) with the MetaCoCo "
    "animal images at the paths in 'address' (relative to the CSV's folder). SPROD "
    "(github.com/anonymouss-neurips2025/SPROD) builds this subset from MetaCoCo's images (Zhang et al., "
    "ICLR 2024). Pass the folder as --data-root or put it at $OODSCOPE_DATA/metacoco.")


def metacoco_class_split(split: int) -> tuple[list[str], list[str]]:
    """``(id_classes, held_out_classes)`` of split ``split`` (sorted names)."""
    if isinstance(split, bool) or int(split) != split or not 0 <= split < METACOCO_SPLITS:
        raise ValueError(f"split must be an integer in 0..{METACOCO_SPLITS - 1}, got {split!r}.")
    held = list(ANIMAL_CLASSES[2 * split: 2 * split + 2])
    return [c for c in ANIMAL_CLASSES if c not in held], held


def _read_metadata(path: Path):
    import pandas as pd

    df = pd.read_csv(path)
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(_COLUMNS)}.")
    unknown = sorted(set(df["class"].astype(str)) - set(ANIMAL_CLASSES))
    if unknown:
        raise ValueError(f"{path}: classes {unknown} are not among the 26 AnimalsMetaCoCo classes.")
    if not set(df["split"].unique()) <= {0, 1, 2}:
        raise ValueError(f"{path}: 'split' must be 0, 1 or 2 (train, val, test), got {sorted(df['split'].unique())}.")
    return df


def metacoco_splits(spec: BenchmarkSpec, options: ProviderOptions) -> dict[str, Any]:
    """Rows of every split (``(image path, label, context)`` lists; OOD label -1) and the
    bookkeeping, read from the metadata CSV before any image: ``train``, ``val_id``,
    ``test_id``, ``val_ood``, ``animals_ood``, ``id_classes``, ``held_out_classes``."""
    from .openood import release_root

    id_classes, held = metacoco_class_split(spec.params["split"])
    shots = spec.params.get("shots")
    if shots is not None and (isinstance(shots, bool) or int(shots) != shots or shots < 1):
        raise ValueError(f"shots must be a positive integer (images per ID class) or None, got {shots!r}.")
    root = release_root("metacoco", [METADATA], options.data_root, spec.name,
                        "the AnimalsMetaCoCo metadata and images", _HOW_TO_GET)
    df = _read_metadata(root / METADATA)
    label_of = {c: i for i, c in enumerate(id_classes)}

    def rows(frame, labelled: bool) -> list[tuple[Path, int, str]]:
        return [(Path(a) if Path(a).is_absolute() else root / a, label_of[c] if labelled else -1, str(ctx))
                for a, c, ctx in zip(frame["address"], frame["class"], frame["attribute"])]

    ids = df[df["class"].isin(id_classes)]
    train = ids[ids["split"] == 0]
    if shots is not None:
        import pandas as pd

        train = pd.concat([train[train["class"] == c].sample(n=min(int(shots), int((train["class"] == c).sum())),
                                                             replace=False, random_state=options.seed)
                           for c in train["class"].unique()])
    ood = df[df["class"].isin(held)]
    perm = np.random.RandomState(options.seed).permutation(len(ood))
    n_val = int(0.1 * len(ood))
    out = {"train": rows(train, True), "val_id": rows(ids[ids["split"] == 1], True),
           "test_id": rows(ids[ids["split"] == 2], True), "val_ood": rows(ood.iloc[perm[:n_val]], False),
           "animals_ood": rows(ood.iloc[perm[n_val:]], False), "id_classes": id_classes,
           "held_out_classes": held, "root": root}
    empty = [k for k in ("train", "val_id", "test_id", "val_ood", "animals_ood") if not out[k]]
    if empty:
        raise ValueError(f"{spec.name}: no rows for {empty} in {root / METADATA} (split {spec.params['split']}).")
    absent = sorted({str(r[0]) for k in ("train", "val_id", "test_id", "val_ood", "animals_ood")
                     for r in out[k] if not r[0].exists()})
    if absent:
        raise FileNotFoundError(f"Benchmark {spec.name!r}: {len(absent)} images listed in {root / METADATA} are "
                                "missing, e.g.\n  " + "\n  ".join(absent[:5]) + "\n" + _HOW_TO_GET)
    return out


def build_metacoco(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """AnimalsMetaCoCo split ``spec.params["split"]`` (see the module docstring)."""
    from ..data import ImageDataset, read_image_files
    from .extract import ImageExtractor, check_model, load_network, model_normalization
    from .ptood import probe_feature_set
    from .vision import _feature_set, image_read_options, imagenet_normalization, input_shape

    sp = metacoco_splits(spec, options)
    if options.net is None and options.model is None:
        raise ValueError(f"Benchmark {spec.name!r} needs --model: a pre-trained backbone (linear-probed on the "
                         "ID classes) or, with linear_probe=False, a classifier of the 24 ID classes.")
    net, meta, source = load_network(options, benchmark=spec.name)
    shape = input_shape(net, meta, source)
    probe = spec.params.get("linear_probe", True)
    if not probe:
        check_model(net, len(sp["id_classes"]), shape, source)
    read = image_read_options(shape, options.progress)

    def dataset(key: str, cap: bool = True) -> ImageDataset:
        rows = sp[key]
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        ds = ImageDataset(read_image_files([r[0] for r in rows], **read), labels if labels.min() >= 0 else None,
                          name=f"metacoco/{key}", meta={"contexts": [r[2] for r in rows]})
        return options.cap(ds) if cap else ds

    mean, std = model_normalization(meta, *imagenet_normalization(shape[0]))
    ex = ImageExtractor(net, mean, std, options)
    sets = {"train": dataset("train", cap=False), **{k: dataset(k) for k in ("val_id", "val_ood", "test_id")}}
    near = {"animals_ood": dataset("animals_ood")} if options.wants("animals_ood") else {}
    fs = _feature_set(ex, sets, near=near)
    if probe:
        fs = probe_feature_set(fs, C=spec.params.get("probe_c", 1.0), seed=options.seed)
    else:
        fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    shots = spec.params.get("shots")
    fs.info.update(
        model=source + (" (frozen backbone + linear probe)" if probe else ""),
        normalization={"mean": mean, "std": std},
        ood_descriptions={"animals_ood": f"the held-out classes {sp['held_out_classes']} (90% of their images)"},
        val_ood_description=f"10% of the images of the held-out classes {sp['held_out_classes']} (SPROD's 'sp' "
                            "validation source), disjoint from the test OOD images",
        notes=[f"AnimalsMetaCoCo split {spec.params['split']}: ID {sp['id_classes']}; held out "
               f"{sp['held_out_classes']}; {'all' if shots is None else shots} training images per class; "
               f"data from {sp['root']}"],
        **ex.info())
    return fs
