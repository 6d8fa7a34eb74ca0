"""Exhaustive KNN search at lower precision: is any of it faster than float32 here, and
what does it cost in recall and score agreement?

    python benchmarks/exact_search_precision.py                 # 50,000 x 512 bank, 5,000 queries
    python benchmarks/exact_search_precision.py --n-test 20000

Same synthetic problem as vs_pytorch_ood.py (features L2-normalised, k=50, test half ID,
half OOD). Compared with faiss ``IndexFlatIP`` (float32 GEMM + heap, what oodscope's exact
search runs):

* torch float32 and bfloat16 matmul per 1,024-query block + ``torch.topk`` (bfloat16 runs on
  AMX / AVX-512-BF16 where the CPU has it; its output is rounded to bfloat16);
* faiss ``IndexScalarQuantizer`` flat search with float16, bfloat16 and int8 codes.

Reported: seconds (wall and process CPU), speed-up over faiss float32, recall@50 against
faiss float32, Spearman of the KNN scores overall and on the ID half alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_pytorch_ood import make_problem  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _torch_search(bank, queries, k, dtype):
    import torch

    with torch.no_grad():
        b = torch.from_numpy(bank).to(dtype)
        vals, ids = [], []
        for start in range(0, len(queries), 1024):
            top = torch.topk(torch.from_numpy(queries[start:start + 1024]).to(dtype) @ b.T, k, dim=1)
            vals.append(top.values.float())
            ids.append(top.indices)
        return torch.cat(vals).numpy(), torch.cat(ids).numpy()


def _faiss_sq(bank, queries, k, qtype):
    import faiss

    index = faiss.IndexScalarQuantizer(bank.shape[1], qtype, faiss.METRIC_INNER_PRODUCT)
    index.train(bank)
    index.add(bank)
    return index.search(queries, k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=5_000)
    p.add_argument("--k", type=int, default=50)
    args = p.parse_args(argv)

    import faiss
    import torch
    from scipy.stats import spearmanr

    a = make_problem(args.n_train, 2 * args.n_test, 512, 10, 0)
    bank = _unit(a["train_features"])
    keep = np.r_[0:args.n_test // 2, args.n_test:args.n_test + args.n_test - args.n_test // 2]
    queries, is_id = _unit(a["test_features"][keep]), a["test_is_id"][keep]
    k = args.k

    def score(vals):
        return -np.sqrt(np.clip(2 - 2 * vals[:, k - 1].astype(np.float64), 0, 4))

    flat = faiss.IndexFlatIP(bank.shape[1])
    flat.add(bank)
    (ref_v, ref_i), wall0, cpu0 = _timed(lambda: flat.search(queries, k))
    ref = score(ref_v)
    sq = faiss.ScalarQuantizer
    methods = {
        "torch float32": lambda: _torch_search(bank, queries, k, torch.float32),
        "torch bfloat16": lambda: _torch_search(bank, queries, k, torch.bfloat16),
        "faiss SQ float16": lambda: _faiss_sq(bank, queries, k, sq.QT_fp16),
        "faiss SQ bfloat16": lambda: _faiss_sq(bank, queries, k, sq.QT_bf16),
        "faiss SQ int8": lambda: _faiss_sq(bank, queries, k, sq.QT_8bit),
    }
    head = (f"{'exhaustive search':<20} {'wall s':>7} {'cpu s':>7} {'speed-up':>8} {'recall@k':>9} "
            f"{'spearman':>9} {'spearman ID':>11}")
    rows = [f"{'faiss flat float32':<20} {wall0:>7.2f} {cpu0:>7.2f} {1.0:>8.2f} {1.0:>9.4f} "
            f"{1.0:>9.5f} {1.0:>11.5f}"]
    for name, fn in methods.items():
        (vals, ids), wall, cpu = _timed(fn)
        s = score(vals)
        recall = np.mean([len(np.intersect1d(x, y)) for x, y in zip(ref_i, ids)]) / k
        rows.append(f"{name:<20} {wall:>7.2f} {cpu:>7.2f} {cpu0 / cpu:>8.2f} {recall:>9.4f} "
                    f"{spearmanr(ref, s).statistic:>9.5f} {spearmanr(ref[is_id], s[is_id]).statistic:>11.5f}")
        print(rows[-1], flush=True)
    print(f"\n{len(bank):,} x {bank.shape[1]} bank, {len(queries):,} queries (half ID), k={k}\n")
    print(head + "\n" + "-" * len(head) + "\n" + "\n".join(rows))
    print("\nspeed-up = faiss flat float32 CPU seconds / this row's; recall@k and Spearman against "
          "faiss flat float32.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
