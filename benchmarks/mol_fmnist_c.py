"""MOL on a shifting Fashion-MNIST-C stream (continuously adaptive OOD detection).

Features: the reference small CNN (trained on clean Fashion-MNIST). Meta-training domains:
clean training images plus six corruptions (gaussian_noise, shot_noise, blur, contrast,
brightness, rotation) at severities 1-5, ``--per-domain`` training images each; MOL is fitted
on them with ``extras["domain"]``. The test stream: the three held-out corruptions
(impulse_noise, pixelate, jpeg), severities 1 → 5, 15 stages. At each stage, ID = Fashion-MNIST
test images under that corruption, OOD = MNIST test images under the same corruption (both
distributions shift), and the stage's support set = ``--shots`` labelled images per class from
the 5,000 held-out Fashion-MNIST training images, under the same corruption.

Compared per stage (AUROC in %, and ID accuracy): the CNN's own energy without adaptation;
MOL's meta-learned head without adaptation; MOL after ``adapt_steps`` steps on the support set.

    OODSCOPE_DATA=../shared/data python benchmarks/mol_fmnist_c.py [--per-domain 600] [--shots 5]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import oodscope as ood
from oodscope import Features

TRAIN_KINDS = ("gaussian_noise", "shot_noise", "blur", "contrast", "brightness", "rotation")
TEST_KINDS = ("impulse_noise", "pixelate", "jpeg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-domain", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--meta-iters", type=int, default=300)
    args = ap.parse_args()
    import torch

    from oodscope import data as D
    from oodscope.bench.vision import FMNIST_MEAN, FMNIST_STD, model_normalization
    from oodscope.extraction import extract
    from oodscope.train import reference_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    net, meta = reference_model("fashion-mnist", train_if_missing=True)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)

    def feats(ds) -> Features:
        return extract(net, D.loader(ds, batch_size=512, shuffle=False, mean=mean, std=std), progress=False)

    rng = np.random.default_rng(0)
    train_all = D.load("fashion-mnist", "train")
    held = np.asarray(meta["val_indices"], dtype=np.int64)
    fit_idx = np.setdiff1d(np.arange(len(train_all)), held)
    t = time.perf_counter()
    parts = []
    domains = [("clean", 0)] + [(k, s) for k in TRAIN_KINDS for s in range(1, 6)]
    for i, (kind, sev) in enumerate(domains):
        base = train_all.subset(rng.choice(fit_idx, args.per_domain, replace=False))
        ds = base if kind == "clean" else D.corrupted_dataset(base, kind, sev, seed=i)
        f = feats(ds)
        parts.append(f.replace(extras={"domain": np.full(len(f), i)}))
    train = Features.concat(parts)
    det = ood.create("mol", meta_iters=args.meta_iters)
    det.fit(train)
    print(f"meta-trained on {len(domains)} domains x {args.per_domain} images in {time.perf_counter() - t:.0f} s "
          f"(final meta loss {det.meta_losses_[-20:].mean():.3f})", flush=True)

    test = D.load("fashion-mnist", "test").subset(np.arange(args.n_test))
    mnist = D.load("mnist", "test").subset(np.arange(args.n_test))
    val = train_all.subset(held)
    support_idx = np.concatenate([rng.choice(np.flatnonzero(val.labels == c), args.shots, replace=False)
                                  for c in range(10)])
    energy = ood.create("energy").fit()
    rows = []
    print(f"{'stage':22s} {'CNN energy':>10s} {'MOL no-adapt':>12s} {'MOL adapted':>11s} "
          f"{'acc CNN':>8s} {'acc MOL':>8s}")
    for kind in TEST_KINDS:
        for sev in range(1, 6):
            f_id = feats(D.corrupted_dataset(test, kind, sev, seed=100 + sev))
            f_ood = feats(D.corrupted_dataset(mnist, kind, sev, seed=200 + sev))
            f_sup = feats(D.corrupted_dataset(val.subset(support_idx), kind, sev, seed=300 + sev))
            a_cnn = ood.metrics.auroc(energy.score(f_id), energy.score(f_ood))
            det.reset()
            a_init = ood.metrics.auroc(det.score(f_id), det.score(f_ood))
            s_id, s_ood = det.score_stream([(f_sup, f_id), (f_sup, f_ood)])
            a_mol = ood.metrics.auroc(s_id, s_ood)
            acc_cnn = float(np.mean(f_id.logits.argmax(1) == f_id.labels))
            acc_mol = float(np.mean(det.logits(f_id).argmax(1) == f_id.labels))
            rows.append((a_cnn, a_init, a_mol, acc_cnn, acc_mol))
            print(f"{kind + ' s' + str(sev):22s} {100 * a_cnn:10.1f} {100 * a_init:12.1f} {100 * a_mol:11.1f} "
                  f"{100 * acc_cnn:8.1f} {100 * acc_mol:8.1f}", flush=True)
    m = np.mean(rows, axis=0)
    print(f"{'mean over 15 stages':22s} {100 * m[0]:10.1f} {100 * m[1]:12.1f} {100 * m[2]:11.1f} "
          f"{100 * m[3]:8.1f} {100 * m[4]:8.1f}")


if __name__ == "__main__":
    main()
