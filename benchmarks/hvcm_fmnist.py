"""HVCM vs cross-entropy on the Fashion-MNIST class split, both scored with ``gmm``.

Trains the small CNN twice per seed under the training comparison's budget
(`oodscope.bench.compare.TrainBudget`: 3 epochs on 6,000 ID images of fashion-mnist-split0),
once with cross-entropy and once with the HVCM objective (CE + attribute / mixture-weight
heads and the class-centre KL loss, K = 32 components, D = 1024), then scores:

* hvcm + gmm: ``gmm(n_chunks=32)`` on the HVCM attributes (`extract_hvcm`), π from the
  mixture-weight head — the paper's pipeline;
* ce + gmm: ``gmm`` on the CE network's penultimate features (n_chunks 8, the default);
* msp and mahalanobis on both networks for reference.

Prints ID accuracy and near (held-out classes) / far (MNIST) AUROC and FPR@95, in %.

    OODSCOPE_DATA=../shared/data python benchmarks/hvcm_fmnist.py [--seeds 0,1,2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import oodscope as ood


def _features(net, data, hvcm: bool):
    from oodscope import data as D
    from oodscope.bench.vision import FMNIST_MEAN, FMNIST_STD
    from oodscope.extraction import extract
    from oodscope.train.hvcm import extract_hvcm

    fn = extract_hvcm if hvcm else extract
    sets = {"train": data.train, "test": data.test_id, "near": data.near_ood, "far": data.far_ood}
    return {k: fn(net, D.loader(v, batch_size=512, shuffle=False, mean=FMNIST_MEAN, std=FMNIST_STD), progress=False)
            for k, v in sets.items()}


def _evaluate(feats, detectors):
    out = {"acc": float(np.mean(feats["test"].logits.argmax(1) == feats["test"].labels))}
    for name, det in detectors.items():
        det.fit(feats["train"])
        s_id = det.score(feats["test"])
        for group in ("near", "far"):
            s = det.score(feats[group])
            out[f"{name}/{group}"] = (ood.metrics.auroc(s_id, s), ood.metrics.fpr_at_95_tpr(s_id, s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=6000)
    args = ap.parse_args()
    import torch

    from oodscope.bench.classsplit import TEST_OOD_SOURCES, split_datasets
    from oodscope.bench.compare import TrainBudget, train_method

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    budget = TrainBudget(epochs=args.epochs, train_size=args.train_size)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = split_datasets(0, seed=seed, train_size=budget.train_size)
        for method in ("ce", "hvcm"):
            t = time.perf_counter()
            net, obj, _, _ = train_method(method, data.train, budget, seed, dict(TEST_OOD_SOURCES), progress=False)
            hv = method == "hvcm"
            dets = {"msp": ood.create("msp"), "mahalanobis": ood.create("mahalanobis"),
                    "gmm": ood.create("gmm", n_chunks=obj.num_components if hv else 8)}
            res = _evaluate(_features(net, data, hv), dets)
            res.update(method=method, seed=seed, seconds=round(time.perf_counter() - t))
            rows.append(res)
            print(f"seed {seed} {method}: acc {100 * res['acc']:.1f} "
                  + " ".join(f"{k} {100 * v[0]:.1f}/{100 * v[1]:.1f}" for k, v in res.items() if "/" in k),
                  f"({res['seconds']} s)", flush=True)
    print("\nmean over seeds (AUROC / FPR@95 in %):")
    for method in ("ce", "hvcm"):
        rs = [r for r in rows if r["method"] == method]
        keys = [k for k in rs[0] if "/" in k]
        print(f"{method:5s} acc {100 * np.mean([r['acc'] for r in rs]):.1f}  " + "  ".join(
            f"{k} {100 * np.mean([r[k][0] for r in rs]):.1f}±{100 * np.std([r[k][0] for r in rs]):.1f}/"
            f"{100 * np.mean([r[k][1] for r in rs]):.1f}" for k in keys))


if __name__ == "__main__":
    main()
