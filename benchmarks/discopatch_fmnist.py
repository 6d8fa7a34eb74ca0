"""DisCoPatch on Fashion-MNIST: covariate shift (Fashion-MNIST-C, every severity) and MNIST.

Trains the unsupervised DisCoPatch detector on the Fashion-MNIST training images (pixels
only, no labels, no classifier), then scores the Fashion-MNIST test set (ID), Fashion-MNIST-C
(the nine corruptions mixed, severities 1-5, and each corruption at ``--severity``) and the
MNIST test set. Prints AUROC / FPR@95 in % per set and the training time.

    OODSCOPE_DATA=../shared/data python benchmarks/discopatch_fmnist.py [--steps 2000] [--n-train 60000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import oodscope as ood
from oodscope import Features
from oodscope import data as D


def _inputs(ds) -> Features:
    return Features(extras={"inputs": np.asarray(ds.images, dtype=np.float32) / 255.0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared, oversubscribed machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    train = D.load("fashion-mnist", "train")
    train = train.subset(np.random.default_rng(0).permutation(len(train))[: args.n_train])
    det = ood.create("discopatch", steps=args.steps)
    t = time.perf_counter()
    det.fit(_inputs(train))
    fit_s = time.perf_counter() - t
    full = D.load("fashion-mnist", "test")
    keep = np.arange(min(args.n_test, len(full)))
    test = full.subset(keep)
    t = time.perf_counter()
    s_id = det.score(_inputs(test))
    score_s = time.perf_counter() - t
    print(f"fit {fit_s:.0f} s, ID scored in {score_s:.1f} s", flush=True)
    # the same test images, corrupted (mixed: image i gets corruption i mod 9)
    sets = {f"fashion-mnist-c mixed s{s}": D.corrupted_dataset(test, None, s) for s in range(1, 6)}
    for kind in D.CORRUPTIONS:
        sets[f"fashion-mnist-c {kind} s{args.severity}"] = D.corrupted_dataset(test, kind, args.severity)
    sets["mnist"] = D.load("mnist", "test").subset(keep)
    print(f"discopatch: trained {args.steps} steps on {len(train)} images in {fit_s:.0f} s; "
          f"scored {len(keep)} ID images in {score_s:.1f} s; final losses {det.final_losses_}")
    print(f"{'OOD set':40s} {'AUROC':>6s} {'FPR@95':>7s}")
    for name, ds in sets.items():
        s_ood = det.score(_inputs(ds))
        m = ood.metrics.evaluate(s_id, s_ood)
        print(f"{name:40s} {100 * m['auroc']:6.1f} {100 * m['fpr_at_95_tpr']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
