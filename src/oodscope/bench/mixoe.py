"""MixOE's fine-grained hold-out-class benchmarks (Bird, Butterfly, Car, Aircraft), read from
the release's own split files.

Zhang et al., "Mixture Outlier Exposure: Towards Out-of-Distribution Detection in Fine-grained
Environments" (WACV 2023); github.com/zjysteven/MixOE, read at commit
3ced26ed97a65d0de5d98a9818903b083c9d3185 (``info/<dataset>/{train,val,test}.txt``,
``utils/dataset.py``: ``SPLIT_NUM_CLASSES`` and ``FinegrainedDataset``), ``eval/eval.py`` at
12221477ced008e8327b3c21d8ccab0e1948ebaf and ``data/README.md`` at 3a4e6d2971d9d33e0353da20debebe26bb110db1.

The data folder is the repository's layout (``--data-root`` = a MixOE checkout with its data)::

    info/<dataset>/train.txt val.txt test.txt   "relative/path label" per line (a path with a
                                                space: the first two tokens, label third)
    data/bird/images/        NABirds            (info paths like 0754/ffcd....jpg)
    data/butterfly/images_small/  Butterfly-200 (074.Leptidea_sinapis/098.jpg)
    data/car/                Stanford Cars      (cars_test/00001.jpg)
    data/aircraft/images/    FGVC-Aircraft      (0836159.jpg)

The "Bird" benchmark is NABirds (dl.allaboutbirds.org/nabirds), not CUB-200: that is what the
release's ``data/README.md`` and ``info/bird`` files use.

Protocol of ``eval/eval.py`` (split ``k`` = the repository's ``split_<k>``):

* classes ``0 .. n_id + n_ood - 1`` (``SPLIT_NUM_CLASSES``: bird 200 + 55, butterfly 150 + 50,
  car 150 + 46, aircraft 90 + 10); ID classes =
  ``numpy.random.RandomState(k).choice(all, n_id, replace=False)``, the rest held out; a
  network's output ``j`` is the ``j``-th smallest ID class label. Rows whose label is outside
  ``0 .. n_id + n_ood - 1`` (NABirds' ``info`` files reach label 554) belong to neither.
* train = ``train.txt`` rows of ID classes; ID-val = ``val.txt`` rows of ID classes; test ID =
  ``test.txt`` rows of ID classes.
* near OOD ``fine``: ``test.txt`` rows of the held-out classes.
* far OOD ``coarse``: the ``test.txt`` rows of the other three datasets, concatenated in the
  order bird, butterfly, car, aircraft, then ``random.seed(0); random.sample(rows, n)`` with
  ``n`` the number of test-ID rows.
* images: resized to 512 × 512 and centre-cropped to 448 (for a network of another input size
  ``s``: resized to ``round(s * 512 / 448)`` and cropped to ``s``), ImageNet mean / std unless
  the checkpoint stores its own.

Deviation: MixOE tunes on WebVision 1.0 images (ImageNet concepts of the four domains removed).
Here the validation OOD set is generated from the ID-val images (patch-shuffled and blurred,
`oodscope.data.generated_outliers`), so no WebVision download is needed and no test set is
touched.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from .spec import BenchmarkSpec, FeatureSet, ProviderOptions

__all__ = ["MIXOE_DATASETS", "build_mixoe", "mixoe_class_split", "mixoe_splits", "read_info_file"]

#: dataset -> (image folder relative to the data root, ID classes, held-out classes)
MIXOE_DATASETS: dict[str, tuple[str, int, int]] = {
    "bird": ("data/bird/images", 200, 55),
    "butterfly": ("data/butterfly/images_small", 150, 50),
    "car": ("data/car", 150, 46),
    "aircraft": ("data/aircraft/images", 90, 10),
}
_HOW_TO_GET = (
    "Layout of github.com/zjysteven/MixOE: clone it (its info/ folder holds the split files) and put the "
    "images under data/ as its data/README.md says: Aircraft www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ "
    "(data/aircraft/images), Bird = NABirds dl.allaboutbirds.org/nabirds (data/bird/images), Car "
    "ai.stanford.edu/~jkrause/cars/car_dataset.html (data/car/cars_train, data/car/cars_test), Butterfly-200 "
    "(data/butterfly/images_small; link in that README). Pass the checkout as --data-root or put it at "
    "$OODSCOPE_DATA/mixoe. With --ood fine only the dataset's own files are needed.")
_TEST_SIZE, _RESIZE_SIZE = 448, 512


def mixoe_class_split(dataset: str, split: int) -> tuple[list[int], list[int]]:
    """``(id_classes, held_out_classes)`` of split ``split`` as MixOE draws them (ID classes in
    draw order; `mixoe_splits` maps them to network outputs in sorted order)."""
    if dataset not in MIXOE_DATASETS:
        raise ValueError(f"Unknown MixOE dataset {dataset!r}; known: {sorted(MIXOE_DATASETS)}.")
    if isinstance(split, bool) or int(split) != split or split < 0:
        raise ValueError(f"split must be a non-negative integer (MixOE's split_<k>), got {split!r}.")
    _, n_id, n_ood = MIXOE_DATASETS[dataset]
    all_classes = list(range(n_id + n_ood))
    drawn = np.random.RandomState(int(split)).choice(all_classes, n_id, replace=False)
    id_classes = [int(c) for c in drawn]
    held = set(id_classes)
    return id_classes, [c for c in all_classes if c not in held]


def read_info_file(path: Path) -> list[tuple[str, int]]:
    """``(relative path, label)`` rows of a MixOE ``info`` file, parsed as ``FinegrainedDataset``
    does: two tokens are path and label; more tokens: the first two joined by a space are the
    path and the third is the label."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}.")
        name, label = (parts[0], parts[1]) if len(parts) == 2 else (" ".join(parts[:2]), parts[2])
        try:
            rows.append((name, int(label)))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: the label {label!r} is not an integer.") from None
    return rows


def _needed(dataset: str, wants_coarse: bool) -> list[str]:
    needed = [f"info/{dataset}/{s}.txt" for s in ("train", "val", "test")] + [MIXOE_DATASETS[dataset][0]]
    if wants_coarse:
        for other in MIXOE_DATASETS:
            if other != dataset:
                needed += [f"info/{other}/test.txt", MIXOE_DATASETS[other][0]]
    return needed


def mixoe_splits(spec: BenchmarkSpec, options: ProviderOptions) -> dict[str, Any]:
    """The rows of every split as ``(image path, label)`` lists (labels: network outputs for ID,
    -1 for OOD) plus the class bookkeeping, without reading an image: ``train``, ``val_id``,
    ``test_id``, ``fine``, ``coarse`` (absent unless asked for), ``id_classes`` (sorted raw
    labels), ``held_out_classes``, ``root``. Missing release files raise before anything else."""
    from .openood import release_root

    dataset, split = spec.params["dataset"], spec.params["split"]
    id_drawn, held_out = mixoe_class_split(dataset, split)
    wants_coarse = options.wants("coarse")
    root = release_root("mixoe", _needed(dataset, wants_coarse), options.data_root, spec.name,
                        f"the MixOE split files and {dataset} images", _HOW_TO_GET)
    images = root / MIXOE_DATASETS[dataset][0]
    to_output = {c: i for i, c in enumerate(sorted(id_drawn))}
    held = set(held_out)

    def rows(split_name: str, keep: Any, relabel: bool) -> list[tuple[Path, int]]:
        return [(images / p, to_output[y] if relabel else -1)
                for p, y in read_info_file(root / f"info/{dataset}/{split_name}.txt") if y in keep]

    out: dict[str, Any] = {"train": rows("train", to_output, True), "val_id": rows("val", to_output, True),
                           "test_id": rows("test", to_output, True), "id_classes": sorted(id_drawn),
                           "held_out_classes": held_out, "root": root}
    if options.wants("fine"):
        out["fine"] = rows("test", held, False)
    if wants_coarse:
        others = [(root / MIXOE_DATASETS[o][0] / p, -1) for o in MIXOE_DATASETS if o != dataset
                  for p, _ in read_info_file(root / f"info/{o}/test.txt")]
        n = len(out["test_id"])
        if n > len(others):
            raise ValueError(f"The coarse OOD set samples {n} rows (the test-ID size) from only {len(others)} "
                             "test rows of the other datasets.")
        out["coarse"] = random.Random(0).sample(others, n)
    empty = [k for k in ("train", "val_id", "test_id", "fine", "coarse") if k in out and not out[k]]
    if empty:
        raise ValueError(f"{spec.name}: no rows for {empty} in {root / 'info' / dataset} (split {split}).")
    return out


def _center_crop(images: np.ndarray, size: int) -> np.ndarray:
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(images[:, top:top + size, left:left + size])


def _read(rows: list[tuple[Path, int]], shape: tuple[int, ...], name: str, progress: bool, labelled: bool):
    from ..data import ImageDataset, read_image_files

    channels, h, w = shape
    if h != w:
        raise ValueError(f"MixOE benchmarks use square inputs; the model takes {h}x{w}.")
    big = int(round(h * _RESIZE_SIZE / _TEST_SIZE))
    imgs = read_image_files([p for p, _ in rows], size=(big, big), mode="L" if channels == 1 else "RGB",
                            progress=progress)
    labels = np.array([y for _, y in rows], dtype=np.int64) if labelled else None
    return ImageDataset(_center_crop(imgs, h), labels, name=name)


def _check_images(sp: dict[str, Any], benchmark: str) -> None:
    paths = [p for k in ("train", "val_id", "test_id", "fine", "coarse") for p, _ in sp.get(k, ())]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Benchmark {benchmark!r}: {len(missing)} of the {len(paths)} images its split "
                                "files list are missing, e.g.\n  " + "\n  ".join(missing[:5]) + "\n" + _HOW_TO_GET)


def build_mixoe(spec: BenchmarkSpec, options: ProviderOptions) -> FeatureSet:
    """A MixOE benchmark (``spec.params``: ``dataset``, ``split``) on the user's checkpoint."""
    from .extract import ImageExtractor, check_model, load_network, model_normalization
    from .vision import _feature_set, _val_ood, imagenet_normalization, input_shape

    sp = mixoe_splits(spec, options)
    _check_images(sp, spec.name)
    if options.net is None and options.model is None:
        raise ValueError(f"Benchmark {spec.name!r} evaluates your network: pass --model path/to/checkpoint "
                         f"(a classifier of the {MIXOE_DATASETS[spec.params['dataset']][1]} ID classes).")
    net, meta, source = load_network(options, benchmark=spec.name)
    shape = input_shape(net, meta, source)
    check_model(net, len(sp["id_classes"]), shape, source)
    mean, std = model_normalization(meta, *imagenet_normalization(shape[0]))
    ds = spec.params["dataset"]
    sets = {"train": _read(sp["train"], shape, f"{ds}/train", options.progress, True)}
    for key in ("val_id", "test_id"):
        sets[key] = options.cap(_read(sp[key], shape, f"{ds}/{key}", options.progress, True))
    sets["val_ood"] = _val_ood(sets["val_id"], options.seed, f"{ds}/val-ood-generated")
    near = {"fine": options.cap(_read(sp["fine"], shape, f"{ds}/fine", options.progress, False))} \
        if "fine" in sp else {}
    far = {"coarse": options.cap(_read(sp["coarse"], shape, "coarse", options.progress, False))} \
        if "coarse" in sp else {}
    ex = ImageExtractor(net, mean, std, options, batch_size=64)
    fs = _feature_set(ex, sets, near=near, far=far)
    fs.info.update(
        model=source, normalization={"mean": mean, "std": std},
        ood_descriptions={"fine": f"{ds} test images of the {len(sp['held_out_classes'])} held-out classes",
                          "coarse": "test images of the other three MixOE datasets (MixOE's seeded sample)"},
        notes=[f"MixOE {ds} split {spec.params['split']}: ID classes (raw labels) {sp['id_classes']}; "
               f"held out {sp['held_out_classes']}; data from {sp['root']}"],
        **ex.info())
    fs.detector_kwargs["*"] = {"model": net, "input_std": std}
    return fs
