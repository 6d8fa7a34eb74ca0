"""Every registered post-hoc detector on the Fashion-MNIST benchmark, from one network pass
per split (prints a table).

The reference CNN (`oodscope.train.reference_model`, trained and cached on first use, as
``oodscope bench fashion-mnist`` does) runs once over each split of the benchmark
(`oodscope.bench.vision.fashion_mnist_splits`: train minus the held-out part, test ID,
MNIST, Gaussian and uniform noise; KMNIST / notMNIST only where their files exist). That one
pass stores logits, penultimate features, the head, the normalised inputs (for the detectors
that run the network again: ODIN, i-ODIN, RankFeat, RankWeight, AdaSCALE, MDSEns) and the
extra layers the multi-layer detectors read. Then every registered detector whose needs
these Features meet is fitted on the train split with its default hyperparameters (no
tuning) and scored on test ID and each far-OOD set; the others are listed with the reason.

Extra layers are pooled right after each chunk's extraction (per-channel mean, or mean and
variance for SEM's low-level statistics) with `oodscope.detectors._network.pool_layer`:
``extract`` keeps whole feature maps, which for Fashion-MNIST's 55,000 training images would
be gigabytes.

    python benchmarks/posthoc_sweep.py --quick          # 2,000 images per split
    python benchmarks/posthoc_sweep.py                  # full splits
    python benchmarks/posthoc_sweep.py --detectors knn,multilayer,sem
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if "OODSCOPE_DATA" not in os.environ and (ROOT.parent / "shared" / "data").exists():
    os.environ["OODSCOPE_DATA"] = str(ROOT.parent / "shared" / "data")
elif "OODSCOPE_DATA" not in os.environ and Path("/work/shared/data").exists():
    os.environ["OODSCOPE_DATA"] = "/work/shared/data"

import numpy as np  # noqa: E402

#: Layers of `SmallCNN` stored per split, and how each is pooled to a vector per image:
#: the first block after its max-pool (SEM's low-level style statistics) and the outputs of
#: the second and third blocks (multi-layer aggregation, with the penultimate features).
LAYER_POOLING = {"features.1": "stat", "features.3": "mean", "features.5": "mean"}
#: Constructor arguments beyond the benchmark's model / input_std.
DETECTOR_KWARGS = {
    "multilayer": {"layers": ["features.3", "features.5", "features"]},
    "sem": {"layers": ["features.1"]},
}


def extract_split(net, ds, mean, std, chunk: int):
    """One network pass over ``ds`` (in chunks, to bound memory), extra layers pooled."""
    from oodscope import Features, data
    from oodscope.detectors._network import pool_layer
    from oodscope.extraction import extract

    parts = []
    for start in range(0, len(ds), chunk):
        part = ds.subset(np.arange(start, min(start + chunk, len(ds))))
        f = extract(net, data.loader(part, batch_size=512, shuffle=False, mean=mean, std=std),
                    layers=list(LAYER_POOLING), keep_inputs=True, progress=False)
        extras = {k: v for k, v in f.extras.items() if not k.startswith("layer:")}
        for name, how in LAYER_POOLING.items():
            extras[f"layer:{name}"] = pool_layer(f.extras[f"layer:{name}"], how).astype(np.float32)
        parts.append(f.replace(extras=extras))
    f = Features.concat(parts)
    if f.labels is None:
        f = f.replace(labels=np.full(len(f), -1, dtype=np.int64))
    return f


def _available(f) -> set[str]:
    return {n for n in ("logits", "features", "labels", "head") if f.has(n)} | set(f.extras) | {"model"}


def sweep_one(name, net, std, train, test_id, far):
    """``(row, None)`` with fit/score seconds and metrics, or ``(None, reason)``."""
    from oodscope.detectors import create, get_detector_class
    from oodscope.metrics import auroc, fpr_at_95_tpr

    cls = get_detector_class(name)
    kwargs = {k: v for k, v in {"model": net, "input_std": std}.items() if k in cls._param_names()}
    kwargs.update(DETECTOR_KWARGS.get(name, {}))
    try:
        det = create(name, **kwargs)
    except ValueError as exc:
        return None, f"cannot be created: {exc}"
    missing = sorted(set(det.all_requirements()) - _available(train))
    if missing:
        return None, f"needs {missing}"
    t0 = time.perf_counter()
    try:
        det.fit(train if det.fit_requirements() else None)
    except ValueError as exc:
        return None, f"fit refused: {str(exc).splitlines()[0]}"
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_id = det.score(test_id)
    far_scores = {k: det.score(v) for k, v in far.items()}
    t_score = time.perf_counter() - t0
    metrics = {k: (auroc(s_id, s), fpr_at_95_tpr(s_id, s)) for k, s in far_scores.items()}
    return {"fit_s": t_fit, "score_s": t_score, "metrics": metrics}, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 images per split (same as --subset 2000)")
    ap.add_argument("--subset", type=int, default=None, help="at most N images per split")
    ap.add_argument("--detectors", default=None, help="comma list (default: every registered detector)")
    ap.add_argument("--chunk", type=int, default=10000, help="images per extraction chunk")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    subset = 2000 if args.quick and args.subset is None else args.subset

    import torch

    from oodscope.bench.extract import model_normalization
    from oodscope.bench.spec import ProviderOptions
    from oodscope.bench.vision import FMNIST_MEAN, FMNIST_STD, fashion_mnist_splits
    from oodscope.detectors import list_detectors
    from oodscope.train import reference_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    net, meta = reference_model("fashion-mnist", train_if_missing=True)
    mean, std = model_normalization(meta, FMNIST_MEAN, FMNIST_STD)
    splits = fashion_mnist_splits(ProviderOptions(subset=subset, progress=False), meta)
    t0 = time.perf_counter()
    train = extract_split(net, splits["train"], mean, std, args.chunk)
    test_id = extract_split(net, splits["test_id"], mean, std, args.chunk)
    far = {k: extract_split(net, v, mean, std, args.chunk) for k, v in splits["far"].items()}
    t_extract = time.perf_counter() - t0
    names = args.detectors.split(",") if args.detectors else list_detectors()

    rows, skipped = {}, {}
    for name in names:
        row, reason = sweep_one(name, net, std, train, test_id, far)
        if row is None:
            skipped[name] = reason
        else:
            rows[name] = row
        print(f"  {name}: {'skipped (' + reason + ')' if row is None else 'done'}", file=sys.stderr, flush=True)
    t_total = time.perf_counter() - t_start

    far_names = list(far)
    print(f"Fashion-MNIST post-hoc sweep: reference CNN (test accuracy {meta.get('test_accuracy', float('nan')):.4f}), "
          f"train {len(train)}, test ID {len(test_id)}, far sets {', '.join(f'{k} {len(v)}' for k, v in far.items())}")
    print(f"default hyperparameters, no tuning; torch threads {torch.get_num_threads()}")
    for note in splits["notes"]:
        print(f"note: {note}")
    head = f"{'detector':<12} {'fit s':>7} {'score s':>8} {'MNIST AUROC':>11} {'MNIST FPR95':>11} " \
           f"{'far AUROC':>9} {'far FPR95':>9}  " + " ".join(f"{k[:14]:>14}" for k in far_names)
    print(head)
    print("-" * len(head))
    for name, r in sorted(rows.items(), key=lambda kv: -np.mean([m[0] for m in kv[1]["metrics"].values()])):
        m = r["metrics"]
        far_auc = np.mean([v[0] for v in m.values()])
        far_fpr = np.mean([v[1] for v in m.values()])
        mn = m.get("mnist", (float("nan"), float("nan")))
        per_set = " ".join(f"{m[k][0] * 100:14.2f}" for k in far_names)
        print(f"{name:<12} {r['fit_s']:7.1f} {r['score_s']:8.1f} {mn[0] * 100:11.2f} {mn[1] * 100:11.2f} "
              f"{far_auc * 100:9.2f} {far_fpr * 100:9.2f}  {per_set}")
    print(f"\n{len(rows)} detectors ran, {len(skipped)} skipped (of {len(names)} requested):")
    for name, reason in skipped.items():
        print(f"  {name}: {reason}")
    fit_score = sum(r["fit_s"] + r["score_s"] for r in rows.values())
    print(f"\nextraction (one pass per split) {t_extract:.1f} s; detectors fit + score {fit_score:.1f} s; "
          f"total sweep {t_total:.1f} s (AUROC / FPR@95 in %, FPR@95 = OOD accepted at 95% ID recall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
