"""Throughput of the logit detectors: score 10M x 1000 logits in chunks, report samples/s.

    python benchmarks/logit_throughput.py                 # 10,000,000 rows x 1000 classes
    python benchmarks/logit_throughput.py --rows 1000000  # quicker

10M x 1000 float32 logits are 40 GB, more than this machine's RAM, so the benchmark
generates a few distinct chunks once (``--pool`` chunks of ``--chunk`` rows, 100 MB each
by default, far larger than any CPU cache) and scores them round-robin until ``--rows``
rows have been scored. Only scoring is timed, through the public API
(``Features(logits=chunk)`` + ``detector.score``), so the per-call validation (finite
check) is included. Two references put the numbers in context: one read pass over the
chunk (``chunk.max(axis=1)``), the floor for any detector, and one ``exp`` pass
(``np.exp(chunk)`` summed), the floor for anything softmax-based.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

DETECTORS = {"MSP": ("msp", {}), "Energy": ("energy", {}), "MaxLogit": ("maxlogit", {}),
             "GEN": ("gen", {})}


def _rate(fn, pool, rows) -> tuple[float, float, float]:
    """Run fn over the pool round-robin until `rows` rows are done;
    (wall seconds, rows/s of wall time, rows/s of process CPU time)."""
    done, i = 0, 0
    fn(pool[0][:1000])  # warm-up (imports, allocator)
    t0, c0 = time.perf_counter(), time.process_time()
    while done < rows:
        chunk = pool[i % len(pool)]
        take = min(len(chunk), rows - done)
        out = fn(chunk if take == len(chunk) else chunk[:take])
        assert len(out) == take
        done += take
        i += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, rows / dt, rows / max(cpu, 1e-9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=25_000, help="rows per scoring call")
    p.add_argument("--pool", type=int, default=4, help="distinct chunks generated")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import oodscope as ood
    from oodscope.detectors import list_detectors

    rng = np.random.default_rng(args.seed)
    pool = []
    for _ in range(args.pool):
        # realistic shape: one confident class per row on top of N(0, 1) logits
        chunk = rng.standard_normal((args.chunk, args.classes), dtype=np.float32)
        chunk[np.arange(args.chunk), rng.integers(0, args.classes, args.chunk)] += 8.0
        pool.append(chunk)
    mb = args.chunk * args.classes * 4 / 2**20
    print(f"{args.rows:,} rows x {args.classes} classes float32 in calls of {args.chunk:,} rows "
          f"({mb:.0f} MB each, {args.pool} distinct chunks)", flush=True)

    available = set(list_detectors())
    rows = []
    refs = {
        "read pass (max)": lambda c: c.max(axis=1),
        "exp pass (sum exp)": lambda c: np.exp(c).sum(axis=1),
    }
    for name, fn in refs.items():
        dt, rate, cpu_rate = _rate(fn, pool, args.rows)
        rows.append((name, dt, rate, cpu_rate))
        print(f"[ref] {name}: {rate:,.0f} rows/s", flush=True)
    for name, (det_name, params) in DETECTORS.items():
        if det_name not in available:
            rows.append((name, None, None, None))
            continue
        det = ood.create(det_name, **params).fit()
        dt, rate, cpu_rate = _rate(lambda c: det.score(ood.Features(logits=c)), pool, args.rows)
        rows.append((name, dt, rate, cpu_rate))
        print(f"[oodscope] {name}: {rate:,.0f} rows/s", flush=True)

    bytes_per_row = args.classes * 4
    print(f"\n{'scorer':<20} {'seconds':>9} {'rows/s':>14} {'GB/s of logits':>15} {'rows/CPU-s':>14}")
    print("-" * 76)
    for name, dt, rate, cpu_rate in rows:
        if dt is None:
            print(f"{name:<20} {'n/a':>9} {'n/a':>14} {'n/a':>15} {'n/a':>14}")
        else:
            print(f"{name:<20} {dt:>9.2f} {rate:>14,.0f} {rate * bytes_per_row / 1e9:>15.2f} {cpu_rate:>14,.0f}")
    print("\nrows/CPU-s: rows per second of process CPU time (steadier than wall time on a busy "
          "machine; with several BLAS/OpenMP threads it sums their time).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
