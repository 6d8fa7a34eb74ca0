"""Fashion-MNIST features for the issue-14 measurements (SDM, HVCM, ...), cached as .npz.

Runs the reference CNN (`oodscope.train.reference_model("fashion-mnist")`, trained once and
cached) over the Fashion-MNIST training images it was trained on, its 5,000 held-out
validation images, the Fashion-MNIST test set, the MNIST test set (far OOD) and
Fashion-MNIST-C at a given corruption severity (covariate shift), and stores each split as
`Features` under ``--out`` (default /tmp/oodscope-literature). Other scripts call `splits()`.

    OODSCOPE_DATA=../shared/data python benchmarks/literature_features.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from oodscope import Features

DEFAULT_OUT = Path(os.environ.get("OODSCOPE_LITERATURE_FEATURES", "/tmp/oodscope-literature"))
NAMES = ("train", "val", "test", "mnist", "fmnist_c3")


def _extract(net, ds, mean, std) -> Features:
    from oodscope import data as D
    from oodscope.extraction import extract

    f = extract(net, D.loader(ds, batch_size=512, shuffle=False, mean=mean, std=std), progress=False)
    if f.labels is None:
        f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
    return f


def build(out: Path = DEFAULT_OUT, severity: int = 3) -> dict[str, Features]:
    import torch

    from oodscope import data as D
    from oodscope.bench.extract import model_normalization
    from oodscope.bench.vision import FMNIST_MEAN, FMNIST_STD
    from oodscope.train import reference_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    net, meta = reference_model("fashion-mnist", train_if_missing=True)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)
    train_all = D.load("fashion-mnist", "train")
    held = np.asarray(meta.get("val_indices", []), dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(train_all)), held)
    sets = {
        "train": train_all.subset(keep),
        "val": train_all.subset(held),
        "test": D.load("fashion-mnist", "test"),
        "mnist": D.load("mnist", "test"),
        f"fmnist_c{severity}": D.load("fashion-mnist-c", severity=severity),
    }
    out.mkdir(parents=True, exist_ok=True)
    feats = {}
    for name, ds in sets.items():
        f = _extract(net, ds, mean, std)
        if name == "mnist":
            f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
        f.save(out / f"{name}.npz")
        feats[name] = f
    return feats


def splits(out: Path | None = None) -> dict[str, Features]:
    """The cached splits (built on first use), in a folder named after the reference CNN's
    checkpoint, so a new reference recipe never reuses features of the old one."""
    if out is None:
        from oodscope.train.reference import reference_path

        out = DEFAULT_OUT / reference_path("fashion-mnist").stem
    if not all((out / f"{n}.npz").exists() for n in NAMES):
        return build(out)
    return {n: Features.load(out / f"{n}.npz") for n in NAMES}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    for k, v in build(args.out).items():
        print(k, v.summary())
