"""Every registered detector on the Fashion-MNIST benchmark, through the benchmark runner, from
one network pass per split (prints a table).

This is ``oodscope bench fashion-mnist --detectors all --no-tune`` without bootstrap CIs, split
so that each detector's row prints as soon as it is done: the benchmark's builder runs the
reference CNN once over each split (train minus the
held-out part, ID-val, generated val-OOD, test ID, MNIST, Gaussian and uniform noise; KMNIST /
notMNIST only where their files exist), storing logits, penultimate features, the head, the
normalised inputs (for the detectors that run the network again) and, pooled per channel in
the same pass, the extra layers the multi-layer detectors read (`oodscope.bench.layers`).
Then `oodscope.bench.runner.run` fits each detector on the train split with its default
hyperparameters and scores test ID and each far-OOD set (and ID-val / val-OOD, recorded by
the runner); those whose inputs the benchmark cannot supply are listed with
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


def _metrics(res) -> dict[str, tuple[float, float]]:
    """OOD set -> (AUROC, FPR@95) of a one-detector result, standard mode, with the far mean."""
    return {r["ood_set"]: (r["auroc"], r["fpr_at_95_tpr"]) for r in res.rows
            if r["status"] == "ok" and r["mode"] == "standard" and r["ood_set"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", type=int, default=None, help="at most N images per split (default: all)")
    ap.add_argument("--detectors", default="all", help="comma list (default: all)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the cached reference model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)

    import torch

    from oodscope.bench.catalog import get_benchmark
    from oodscope.bench.runner import run
    from oodscope.bench.spec import ProviderOptions
    from oodscope.detectors import list_detectors

    if args.threads:
        torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    spec = get_benchmark("fashion-mnist")
    names = None if args.detectors == "all" else tuple(d.strip() for d in args.detectors.split(","))
    # what run_benchmark does, split so that each detector's row is printed as soon as it is done
    fs = spec.builder()(spec, ProviderOptions(model=args.model, subset=args.subset, progress=False, detectors=names))
    info = fs.info
    far = list(fs.far_ood)
    print(f"Fashion-MNIST, every detector through the runner: {info.get('model')}; splits "
          f"{ {k: len(v) for k, v in [('train', fs.train), ('test_id', fs.test_id), *fs.far_ood.items()]} }")
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
    metrics, skipped = {}, {}
    for name in names or list_detectors():
        res = run(fs, [name], benchmark=spec.name, tune_params=False, ci=False, progress=False)
        skipped.update(res.skipped)
        if name in res.skipped:
            continue
        m = metrics[name] = _metrics(res)
        t = res.timings[0]
        cells = [name, f"{t['fit_s']:.1f}", f"{t['score_s']:.1f}",
                 *(f"{m[k][0] * 100:.2f}" for k in far), *(f"{m[k][1] * 100:.2f}" for k in far),
                 f"{m['far (mean)'][0] * 100:.2f}", f"{m['far (mean)'][1] * 100:.2f}"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""), flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\n{len(metrics)} detectors ran, {len(skipped)} skipped:")
    for name, reason in sorted(skipped.items()):
        print(f"  {name}: {reason}")
    extraction = sum(info.get("timings", {}).values())
    print(f"\nextraction (one pass per split) {extraction:.1f} s; whole sweep wall {wall:.1f} s, "
          f"process CPU {cpu:.1f} s (AUROC / FPR@95 in %, FPR@95 = OOD accepted at 95% ID recall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
