"""MultiOOD on a small two-modality benchmark built from Fashion-MNIST.

The two "modalities" are the top and the bottom half of each image
(`oodscope.train.multimodal.two_view_images`), each with its own MLP encoder and head plus a
fused head. ID: the six ID classes of fashion-mnist-split0 (6,000 training images); near OOD:
the four held-out classes; far OOD: MNIST. Three trainings with the same budget:
baseline (CE of fused + per-modality heads), + A2D (weight 1.0), + A2D and NP-Mix (0.5 each,
as the repo's HMDB/UCF near-OOD scripts). Scored with MSP and energy on the fused logits, and
with the z-score fusion of the two modality heads' energies (`ModalityScoreFusion`, fitted on
ID validation images). AUROC in %, mean ± std over seeds.

Deviations from the paper's recipe for a CPU: MLP encoders trained from scratch (the paper
fine-tunes pretrained SlowFast / SlowOnly backbones), lr 1e-3 instead of 1e-4, 12 epochs with
NP-Mix from epoch 4 (paper: 50 epochs, from epoch 10).

    OODSCOPE_DATA=../shared/data python benchmarks/multiood_fmnist.py [--seeds 0,1,2] [--epochs 12]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

import oodscope as ood
from oodscope.train.multimodal import ModalityScoreFusion, MultiModalNet, train_multimodal, two_view_images


def _net(seed: int, width: int, num_classes: int) -> MultiModalNet:
    torch.manual_seed(seed)
    enc = [nn.Sequential(nn.Linear(392, 256), nn.ReLU(), nn.Linear(256, width), nn.ReLU()) for _ in range(2)]
    return MultiModalNet(enc, [width, width], num_classes)


def _outputs(net, images):
    with torch.no_grad():
        out = net([torch.as_tensor(v) for v in two_view_images(images)])
    return out["logits"].numpy().astype(np.float64), [z.numpy().astype(np.float64) for z in out["modality_logits"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-size", type=int, default=6000)
    args = ap.parse_args()
    from oodscope._numeric import logsumexp, softmax
    from oodscope.bench.classsplit import split_datasets

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    configs = {"baseline": dict(a2d_weight=0.0, npmix=False), "a2d": dict(a2d_weight=1.0, npmix=False),
               "a2d+npmix": dict(a2d_weight=0.5, npmix=True, entropy_weight=0.5, ood_a2d_weight=0.5)}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = split_datasets(0, seed=seed, train_size=args.train_size)
        n_cls = int(data.train.labels.max()) + 1
        for name, cfg in configs.items():
            net = _net(seed, 64, n_cls)
            train_multimodal(net, two_view_images(data.train.images), data.train.labels, epochs=args.epochs,
                             lr=1e-3, batch_size=64, start_epoch=4, seed=seed, **cfg)
            val_f, val_m = _outputs(net, data.val.images)
            fusion = ModalityScoreFusion("zscore").fit([logsumexp(z, axis=1) for z in val_m])
            test_f, test_m = _outputs(net, data.test_id.images)
            row = {"acc": float(np.mean(test_f.argmax(1) == data.test_id.labels))}
            scores_id = {"msp": softmax(test_f, 1).max(1), "energy": logsumexp(test_f, axis=1),
                         "fused-energy": fusion.score([logsumexp(z, axis=1) for z in test_m])}
            for group, ds in (("near", data.near_ood), ("far", data.far_ood)):
                f, m = _outputs(net, ds.images)
                s_ood = {"msp": softmax(f, 1).max(1), "energy": logsumexp(f, axis=1),
                         "fused-energy": fusion.score([logsumexp(z, axis=1) for z in m])}
                for k in scores_id:
                    row[f"{k}/{group}"] = ood.metrics.auroc(scores_id[k], s_ood[k])
            results[name].append(row)
            print(f"seed {seed} {name}: " + " ".join(f"{k} {100 * v:.1f}" for k, v in row.items()), flush=True)
    print("\nmean ± std over seeds (ID accuracy and AUROC in %):")
    for name, rows in results.items():
        print(f"{name:10s} " + "  ".join(f"{k} {100 * np.mean([r[k] for r in rows]):.1f}±"
                                          f"{100 * np.std([r[k] for r in rows]):.1f}" for k in rows[0]))


if __name__ == "__main__":
    main()
