"""Latency and throughput of ``oodscope serve`` on loopback (a bounded load loop).

Builds a k-NN guard on an N × D bank (default 50,000 × 512), saves it, starts
``oodscope serve`` in a separate process on 127.0.0.1, then runs two bounded loops from
this process with C concurrent keep-alive connections:

1. ``--single`` requests of one row (JSON body): p50 / p99 / max latency;
2. ``--batches`` requests of ``--batch-rows`` rows (``.npy`` body): latency and rows/s.

Every response must be HTTP 200; any other status is counted and printed. The loops stop
by themselves (fixed request counts, plus a ``--max-seconds`` wall-clock cap each).

The bank is synthetic but shaped like CNN penultimate features: rectified mixtures of
class centres in a 64-dimensional latent space embedded in D dimensions, plus noise.

    python benchmarks/serve_latency.py                      # exact k-NN
    python benchmarks/serve_latency.py --index ivf          # approximate, recall@k calibrated to >= 0.99
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def bank_like_cnn_features(n: int, d: int, classes: int = 10, latent: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    lift = rng.standard_normal((latent, d)) / np.sqrt(latent)
    centres = rng.standard_normal((classes, latent)) * 2.0
    y = rng.integers(0, classes, n)
    z = centres[y] + rng.standard_normal((n, latent))
    x = np.maximum(z @ lift, 0.0) + 0.05 * rng.standard_normal((n, d))
    return x.astype(np.float32), y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def load_loop(port: int, bodies: list[bytes], ctype: str, concurrency: int, max_seconds: float):
    """Send every body once over ``concurrency`` keep-alive connections; return latencies
    (s) of the completed requests, the statuses that were not 200 and the wall time."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + max_seconds

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies) or time.monotonic() > stop_at:
                break
            t0 = time.perf_counter()
            conn.request("POST", "/score", body=bodies[i], headers={"Content-Type": ctype})
            r = conn.getresponse()
            r.read()
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if r.status != 200:
                    errors.append(str(r.status))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), errors, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--index", default="exact", help="knn index: exact, ivf, hnsw, auto")
    ap.add_argument("--single", type=int, default=2000, help="single-row requests")
    ap.add_argument("--batches", type=int, default=100, help="batch requests")
    ap.add_argument("--batch-rows", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="cap per loop")
    args = ap.parse_args(argv)

    import oodscope as ood

    x, _ = bank_like_cnn_features(args.bank + 5000, args.dim)
    bank, cal = x[: args.bank], x[args.bank:]
    queries, _ = bank_like_cnn_features(max(args.single, args.batch_rows * 4), args.dim, seed=1)
    t0 = time.perf_counter()
    guard = ood.Guard("knn", detector_params={"k": args.k, "index": args.index}).fit(
        ood.Features(features=bank), val=ood.Features(features=cal))
    fit_s = time.perf_counter() - t0
    recall = getattr(guard.detector, "recall_at_k_", None)
    tmp = Path(tempfile.mkdtemp(prefix="oodscope-serve-bench-"))
    guard.save(tmp / "guard")
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "oodscope.cli", "serve", str(tmp / "guard"),
                             "--port", str(port), "--max-rows", str(max(args.batch_rows, 1))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, proc)
        single = [json.dumps({"features": [queries[i % len(queries)].tolist()]}).encode()
                  for i in range(args.single)]
        warm = single[: min(50, len(single))]
        load_loop(port, warm, "application/json", 1, 30)  # warm-up, not measured
        lat1, err1, wall1 = load_loop(port, single, "application/json", args.concurrency,
                                      args.max_seconds)
        batches = []
        for i in range(args.batches):
            buf = io.BytesIO()
            start = (i * args.batch_rows) % (len(queries) - args.batch_rows + 1)
            np.save(buf, queries[start:start + args.batch_rows])
            batches.append(buf.getvalue())
        latb, errb, wallb = load_loop(port, batches, "application/x-npy", args.concurrency,
                                      args.max_seconds)
    finally:
        proc.terminate()
        proc.wait(10)

    ms = lambda a, q: 1000 * float(np.quantile(a, q)) if len(a) else float("nan")  # noqa: E731
    print(f"knn guard: bank {args.bank} x {args.dim}, k={args.k}, index={args.index}, fit+calibrate "
          f"{fit_s:.1f} s" + (f", recall@k {recall:.4f}" if recall is not None else ""))
    print(f"load: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    print()
    print("| loop | requests | rows/request | concurrency | p50 ms | p99 ms | max ms | rows/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, lat, err, wall, rows in (("single row (JSON)", lat1, err1, wall1, 1),
                                       ("batch (.npy)", latb, errb, wallb, args.batch_rows)):
        print(f"| {name} | {len(lat)} | {rows} | {args.concurrency} | {ms(lat, 0.5):.2f} | "
              f"{ms(lat, 0.99):.2f} | {1000 * lat.max() if len(lat) else float('nan'):.2f} | "
              f"{len(lat) * rows / wall:,.0f} | {len(err)} |")
    return 0 if not (err1 or errb) else 1


if __name__ == "__main__":
    sys.exit(main())
