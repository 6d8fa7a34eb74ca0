"""``oodscope fit``: fit a detector on ID features, calibrate its threshold, save a guard.

    oodscope fit --features train.npz --val val.npz --detector knn --out guard/
    oodscope fit --features train.npz --detector mahalanobis --fpr 0.05 --ood-val ood.npz --out g/
"""

from __future__ import annotations

import argparse

from .inputs import parse_params, read_features


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, metavar="FILE",
                   help="in-distribution training features (Features .npz/dir, plain .npz or .npy)")
    p.add_argument("--val", default=None, metavar="FILE",
                   help="held-out ID features for calibration (default: hold out "
                        "--calibration-split of --features)%(default).0s")
    p.add_argument("--detector", default="knn", help="registered detector name (oodscope list)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="detector hyperparameter, repeatable (e.g. --param k=10)%(default).0s")
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of ID inputs to accept")
    p.add_argument("--fpr", type=float, default=None,
                   help="instead of --tpr: largest fraction of OOD accepted; needs --ood-val%(default).0s")
    p.add_argument("--ood-val", default=None, metavar="FILE",
                   help="OOD calibration features (with --fpr)%(default).0s")
    p.add_argument("--calibration-split", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the guard to")


def run(args: argparse.Namespace) -> int:
    from ..guard import Guard

    if args.ood_val is not None and args.fpr is None:
        raise ValueError("--ood-val is used with --fpr only.")
    guard = Guard(args.detector, tpr=args.tpr, fpr=args.fpr, detector_params=parse_params(args.param),
                  calibration_split=args.calibration_split, seed=args.seed)
    train = read_features(args.features)
    val = read_features(args.val, "--val") if args.val else None
    ood_val = read_features(args.ood_val, "--ood-val") if args.ood_val else None
    guard.fit(train, val=val, ood_val=ood_val)
    path = guard.save(args.out)
    info = guard.info()
    lo, hi = info["threshold_ci"]
    print(f"{info['detector']}: threshold {info['threshold']:.6g} (95% bootstrap {lo:.6g} .. {hi:.6g}), "
          f"calibration TPR {100 * info['calibration']['tpr']:.2f}% on {info['calibration']['n']} "
          f"samples ({info['calibration']['source']})")
    print(f"saved  {path}")
    return 0
