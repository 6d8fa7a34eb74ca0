"""MLKD on CLINC150 (in-scope test vs oos_test), on a CPU, offline.

No pretrained causal LM can be downloaded here, so the paper's teacher (GPT-2 fine-tuned on
the ID text) is replaced by the packaged all-MiniLM-L6-v2 encoder (`teacher_model="minilm"`):
it teaches the student's intermediate layers (two best-matching MiniLM layers per aligned
student layer, through a learned projection) and the student also learns with its own LM
loss, since an encoder has no next-token distribution to distil. The student is a small
randomly initialised GPT-2 (``--layers`` x ``--width``) over MiniLM's WordPiece vocabulary,
trained on the 15,000 in-scope training utterances only. Baseline with the same student,
budget and data: the LM loss alone (``hidden_weight=0``; the paper's "M fromScratch").

Scores: the student's perplexity (S = −log PPL) and the distillation distance. Prints AUROC,
AUPR-In and FPR@95 in %, and the time per configuration (the machine is shared: indicative).

    OODSCOPE_DATA=../shared/data HF_HUB_OFFLINE=1 python benchmarks/mlkd_clinc.py [--steps 1500] [--threads 1] [--n-test 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import oodscope as ood
from oodscope import Features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=0,
                    help="score a seeded random subset of this many texts per test split (0 = all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared, oversubscribed machine)")
    args = ap.parse_args()
    import torch

    from oodscope.text import load_clinc150, text_array

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    ds = load_clinc150("full")

    def feats(split, n=0):
        texts = text_array(ds[split].texts)
        if 0 < n < len(texts):
            texts = texts[np.sort(np.random.default_rng(0).choice(len(texts), n, replace=False))]
        return Features(extras={"text": texts})

    train, test_id, test_ood = feats("train"), feats("test", args.n_test), feats("oos_test", args.n_test)
    student = {"n_layer": args.layers, "n_embd": args.width, "n_head": max(1, args.width // 64), "n_positions": 64}
    configs = {"LM from scratch (baseline)": dict(hidden_weight=0.0),
               "MLKD, MiniLM teacher": dict(hidden_weight=1.0)}
    print(f"student GPT-2 {args.layers}x{args.width}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}; "
          f"train {len(train)} in-scope, test {len(test_id)} in-scope vs {len(test_ood)} oos")
    for name, cfg in configs.items():
        t = time.perf_counter()
        det = ood.create("mlkd", teacher_model="minilm", lm_weight=1.0, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, student=student, max_length=48, scoring="distillation", **cfg)
        det.fit(train)
        fit_s = time.perf_counter() - t
        for scoring in ("perplexity", "distillation") if cfg["hidden_weight"] else ("perplexity",):
            det.scoring = scoring
            m = ood.metrics.evaluate(det.score(test_id), det.score(test_ood))
            print(f"{name:28s} {scoring:13s} AUROC {100 * m['auroc']:.2f}  AUPR-In {100 * m['aupr_in']:.2f}  "
                  f"FPR@95 {100 * m['fpr_at_95_tpr']:.2f}  (fit {fit_s:.0f} s, final loss {det.final_loss_:.3f})",
                  flush=True)


if __name__ == "__main__":
    main()
