"""Every registered detector on the Fashion-MNIST benchmark, through the benchmark runner, from
one network pass per split (prints a table).

This is ``oodscope bench fashion-mnist --detectors all --no-tune`` without bootstrap CIs:
`oodscope.bench.run_benchmark` runs the reference CNN once over each split (train minus the
held-out part, ID-val, generated val-OOD, test ID, MNIST, Gaussian and uniform noise; KMNIST /
notMNIST only where their files exist), storing logits, penultimate features, the head, the
normalised inputs (for the detectors that run the network again) and, pooled per channel in
the same pass, the extra layers the multi-layer detectors read (`oodscope.bench.layers`).
Every detector is fitted on the train split with its default hyperparameters and scored on
test ID and each far-OOD set; those whose inputs the benchmark cannot supply are listed with
the runner's reason. Wall time and process CPU time (all threads) of the whole run are
printed at the end.

The network is the cached reference model (`oodscope.train.reference_model`, never trained
here): pass ``--model PATH`` when its recipe hash differs from the cached file's.

    python benchmarks/posthoc_sweep.py --subset 2000
    python benchmarks/posthoc_sweep.py --model ~/.cache/oodscope/models/<file>.safetensors
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
if "OODSCOPE_DATA" not in os.environ and Path("/work/shared/data").exists():
    os.environ["OODSCOPE_DATA"] = "/work/shared/data"

import numpy as np  # noqa: E402


def _rows(res) -> dict[str, dict[str, tuple[float, float]]]:
    """detector -> OOD set -> (AUROC, FPR@95), standard mode, every set and the far mean."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for r in res.rows:
        if r.get("status", "ok") == "ok" and r["mode"] == "standard" and r["ood_set"]:
            out.setdefault(r["detector"], {})[r["ood_set"]] = (r["auroc"], r["fpr_at_95_tpr"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", type=int, default=None, help="at most N images per split (default: all)")
    ap.add_argument("--detectors", default="all", help="comma list (default: all)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the cached reference model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)

    import torch

    from oodscope.bench import run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_benchmark("fashion-mnist", args.detectors, tune_params=False, ci=False, progress=False,
                        provider_options={"model": args.model, "subset": args.subset, "progress": False})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    info = res.info
    metrics = _rows(res)
    far = [k for k, g in res.groups.items() if g == "far"]
    timing = {t["detector"]: t for t in res.timings if t.get("status") == "ok"}
    print(f"Fashion-MNIST, every detector through the runner: {info.get('model')}; "
          f"test accuracy {info.get('id_accuracy', float('nan')):.4f}; splits {info['splits']}")
    print(f"default hyperparameters, no tuning; extra layers {info.get('extra_layers')}; "
          f"torch threads {torch.get_num_threads()}")
    for note in info.get("notes", []):
        print(f"note: {note}")
    cols = ["detector", "fit s", "score s", *(f"{k} AUROC" for k in far), *(f"{k} FPR95" for k in far),
            "far AUROC", "far FPR95"]
    sep = " | " if args.markdown else "  "
    print(("| " if args.markdown else "") + sep.join(cols) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    order = sorted(metrics, key=lambda d: -metrics[d].get("far (mean)", (np.nan,))[0])
    for d in order:
        m, t = metrics[d], timing.get(d, {})
        cells = [d, f"{t.get('fit_s', np.nan):.1f}", f"{t.get('score_s', np.nan):.1f}",
                 *(f"{m[k][0] * 100:.2f}" for k in far), *(f"{m[k][1] * 100:.2f}" for k in far),
                 f"{m['far (mean)'][0] * 100:.2f}", f"{m['far (mean)'][1] * 100:.2f}"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    print(f"\n{len(metrics)} detectors ran, {len(res.skipped)} skipped:")
    for name, reason in sorted(res.skipped.items()):
        print(f"  {name}: {reason}")
    extraction = sum(info.get("timings", {}).values())
    print(f"\nextraction (one pass per split) {extraction:.1f} s; whole sweep wall {wall:.1f} s, "
          f"process CPU {cpu:.1f} s (AUROC / FPR@95 in %, FPR@95 = OOD accepted at 95% ID recall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
