"""WiSE-FT and BANG on Fashion-MNIST: accuracy under covariate shift and OOD detection.

Protocol (all numbers come from this run; nothing is hard-coded):

1. "pre-trained" θ0: the reference `SmallCNN` (`oodscope.train.reference_model`, trained
   and cached on first use: 5 epochs on the Fashion-MNIST training split minus its 5,000
   held-out images).
2. fine-tuned θ1: θ0 trained further on the same images (``--finetune-epochs``, Adam at
   ``--finetune-lr``, cosine), plain cross-entropy, no augmentation.
3. BANG fine-tune θ1': the same budget with Mixup (α=0.2) + label smoothing (0.1).
4. for α in ``--alphas``: WiSE-FT models ``(1-α)θ0 + αθ1`` and ``(1-α)θ0 + αθ1'``
   (`oodscope.train.weight_ensembles.finetune_and_ensemble`), plus the uniform soup of θ1
   and θ1'.

Each model is measured on the clean test images, on oodscope's synthetic corruptions of
the same images (mixed kinds, severities 1-5; *not* the published FMNIST-C, which is not
available here) and, for detection, MSP and energy AUROC / FPR95 with Fashion-MNIST test
as ID and MNIST test as OOD. Results go to ``--out`` (JSON) and a table is printed.

    python benchmarks/weight_ensembles_fmnist.py --out runs/weight_ensembles.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if "OODSCOPE_DATA" not in os.environ and (ROOT.parent / "shared" / "data").exists():
    os.environ["OODSCOPE_DATA"] = str(ROOT.parent / "shared" / "data")


def _logits(model, ds, mean, std):
    import torch

    from oodscope import data as D

    out = []
    model.eval()
    with torch.no_grad():
        for x, _ in D.loader(ds, 1000, mean=mean, std=std):
            out.append(model(x).double())
    return torch.cat(out).numpy()


def _measure(model, test, shifted, ood, mean, std):
    import oodscope as ood_pkg
    from oodscope import Features
    from oodscope.generalization import shift_accuracies, shift_summary

    feats = {name: Features(logits=_logits(model, ds, mean, std), labels=ds.labels)
             for name, ds in {"clean": test, **shifted}.items()}
    l_id, l_ood = feats["clean"].logits, _logits(model, ood, mean, std)
    acc = shift_accuracies(feats.pop("clean"), feats)
    det = {}
    for name in ("msp", "energy"):
        d = ood_pkg.create(name).fit()
        s_id, s_ood = d.score(Features(logits=l_id)), d.score(Features(logits=l_ood))
        det[name] = {"auroc": ood_pkg.metrics.auroc(s_id, s_ood),
                     "fpr95": ood_pkg.metrics.fpr_at_95_tpr(s_id, s_ood)}
    return {"accuracy": acc, "summary": shift_summary(acc), "detection": det}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--test-size", type=int, default=10000, help="test images (ID and each shifted copy)")
    p.add_argument("--ood-size", type=int, default=10000, help="MNIST test images used as OOD")
    p.add_argument("--train-subset", type=int, default=None, help="train on N images (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/weight_ensembles_fmnist.json")
    args = p.parse_args(argv)

    import torch

    from oodscope import data as D
    from oodscope.generalization import synthetic_shift_sets
    from oodscope.train.reference import holdout_split, reference_model
    from oodscope.train.weight_ensembles import average_weights, finetune_and_ensemble

    torch.set_num_threads(args.threads)
    t_start = time.time()
    theta0, meta = reference_model("fashion-mnist", seed=args.seed, progress=False)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    train = D.load("fashion-mnist", "train")
    tr_idx, _ = holdout_split(train.labels, 5000, args.seed)
    train = train.subset(tr_idx, name="fashion-mnist/train-minus-val")
    if args.train_subset:
        train = train.sample(args.train_subset, seed=args.seed)
    test = D.load("fashion-mnist", "test").sample(args.test_size, seed=args.seed)
    mnist = D.load("mnist", "test").sample(args.ood_size, seed=args.seed)
    ood = D.ImageDataset(mnist.images, None, [], name="mnist/test")
    shifted = synthetic_shift_sets(test, severities=(1, 2, 3, 4, 5), seed=args.seed)

    common = dict(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=128, optimizer="adam",
                  schedule="cosine", mean=mean, std=std, seed=args.seed, progress=False)
    times = {"reference_train_s (cached or not)": meta.get("train_time_s")}
    t0 = time.time()
    wise, ft, h1 = finetune_and_ensemble(theta0, train, "wise-ft", args.alphas, **common)
    times["finetune_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    bang, ft_bang, h2 = finetune_and_ensemble(theta0, train, "bang", args.alphas, **common)
    times["finetune_bang_s"] = round(time.time() - t0, 1)

    rows = {}
    for a in args.alphas:
        rows[f"wise-ft a={a:g}"] = _measure(wise[a], test, shifted, ood, mean, std)
        rows[f"bang a={a:g}"] = _measure(bang[a], test, shifted, ood, mean, std)
    rows["soup(ft, bang-ft)"] = _measure(average_weights([ft, ft_bang]), test, shifted, ood, mean, std)
    result = {
        "protocol": {k: v for k, v in vars(args).items() if k != "out"},
        "shift_sets": "oodscope synthetic corruptions (mixed kinds), severities 1-5 - not the published FMNIST-C",
        "ood_set": "MNIST test", "times": times, "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.time() - t_start, 1), "rows": rows,
        "reference": {"test_accuracy": meta.get("test_accuracy"), "recipe": meta.get("recipe")},
        "histories": {"finetune": h1["train_loss"], "finetune_bang": h2["train_loss"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'model':22s} {'clean':>6s} {'shift':>6s} {'s5':>6s} {'MSP AUROC':>9s} {'FPR95':>6s} "
          f"{'Energy AUROC':>12s} {'FPR95':>6s}")
    for name, r in rows.items():
        acc, d = r["accuracy"], r["detection"]
        print(f"{name:22s} {100 * acc['clean']:6.2f} {100 * r['summary']['mean_shift_accuracy']:6.2f} "
              f"{100 * acc['synthetic-mixed/s5']:6.2f} {100 * d['msp']['auroc']:9.2f} {100 * d['msp']['fpr95']:6.2f} "
              f"{100 * d['energy']['auroc']:12.2f} {100 * d['energy']['fpr95']:6.2f}")
    print(f"times: {times}, wall {result['wall_s']} s, threads {torch.get_num_threads()}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
