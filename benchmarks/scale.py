"""ImageNet-1K-size feature bank: streaming fits, approximate KNN, and peak memory per detector.

    python benchmarks/scale.py --quick          # 50,000 x 512, 100 classes (minutes)
    python benchmarks/scale.py                  # 1,281,167 x 2048 float16, 1000 classes,
                                                # 50,000 test samples (~5.3 GB bank on disk)

The bank is synthetic (post-ReLU Gaussian class clusters), written once in chunks as a
memory-mapped ``.npy`` in the Features directory format (``--data-dir``, reused when the
size matches) with a random 1000-way head; the test set is half ID, half OOD.

Each detector runs in its own child process so its peak memory can be measured alone:

* Mahalanobis, RMD (``rmds``) and ViM stream over the memory-mapped bank in chunks;
* KNN exact (faiss flat) on a seeded 1% subsample of the bank (the KNN paper's ImageNet
  setting, k=1000), and KNN over the full bank with a faiss IVF index holding float16
  vectors, whose nprobe is raised at fit time until recall@k >= 0.99 on held-out bank rows;
  recall@k is then checked on ID and OOD test queries against exact search.

Reported per detector: fit and score wall time, peak RSS (``VmHWM``: includes the pages of
the memory-mapped bank that are resident in the process; the streaming fits release them
chunk by chunk) and the peak of anonymous memory (``RssAnon``, sampled every 20 ms: what
the detector allocates). Target: peak RSS <= 6 GB per detector.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FULL = dict(n_train=1_281_167, dim=2048, classes=1000, n_test=50_000, knn_k=1000, ivf_k=50,
            recall_sample=500)
QUICK = dict(n_train=50_000, dim=512, classes=100, n_test=5_000, knn_k=50, ivf_k=50,
             recall_sample=500)
GB = 1024**3


# ----------------------------------------------------------------------------- data
def make_bank(root: Path, n_train: int, dim: int, classes: int, n_test: int, dtype: str,
              seed: int = 0, chunk: int = 32_768) -> tuple[Path, Path]:
    """Write train/ and test/ Features directories (memmap-able); reuse them if present."""
    from oodscope import Features

    spec = dict(n_train=n_train, dim=dim, classes=classes, n_test=n_test, dtype=dtype, seed=seed, v=2)
    stamp = root / "spec.json"
    train_dir, test_dir = root / "train", root / "test"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return train_dir, test_dir
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    means = (np.abs(rng.standard_normal((classes, dim))) * (rng.random((classes, dim)) < 0.25) * 2.0).astype(np.float32)
    w = (rng.standard_normal((classes, dim)) / np.sqrt(dim)).astype(np.float32)
    w += 0.5 * means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-6)
    b = (0.1 * rng.standard_normal(classes)).astype(np.float32)

    train_dir.mkdir(exist_ok=True)
    feats = np.lib.format.open_memmap(train_dir / "features.npy", mode="w+", dtype=dtype, shape=(n_train, dim))
    labels = rng.integers(0, classes, n_train)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n_train, chunk), desc="write bank", unit="chunk"):
        y = labels[start:start + chunk]
        x = means[y] + rng.standard_normal((len(y), dim), dtype=np.float32)
        feats[start:start + len(y)] = np.maximum(x, 0.0)
    feats.flush()
    del feats
    np.save(train_dir / "labels.npy", labels)
    np.save(train_dir / "head_weight.npy", w)
    np.save(train_dir / "head_bias.npy", b)
    (train_dir / "meta.json").write_text(json.dumps({"format": "oodscope.Features", "version": 1,
                                                     "meta": {"synthetic": spec}}))
    n_id = n_test // 2
    y_id = rng.integers(0, classes, n_id)
    x_id = np.maximum(means[y_id] + rng.standard_normal((n_id, dim), dtype=np.float32), 0)
    # OOD: unseen classes with sparser, stronger means (stays OOD for KNN with large k even
    # when the 1% bank holds only a dozen samples per class)
    ood_means = (np.abs(rng.standard_normal((classes, dim))) * (rng.random((classes, dim)) < 0.05) * 4.0).astype(np.float32)
    y_ood = rng.integers(0, classes, n_test - n_id)
    x_ood = np.maximum(ood_means[y_ood] + rng.standard_normal((n_test - n_id, dim), dtype=np.float32), 0)
    x_te = np.concatenate([x_id, x_ood]).astype(dtype)
    test = Features(logits=x_te.astype(np.float32) @ w.T + b, features=x_te,
                    labels=np.r_[y_id, -np.ones(n_test - n_id, dtype=np.int64)],
                    head_weight=w, head_bias=b, meta={"synthetic": spec})
    test.save(test_dir)
    stamp.write_text(json.dumps(spec))
    return train_dir, test_dir


# ----------------------------------------------------------------------------- child process
class _MemoryMonitor:
    """Samples RssAnon from /proc/self/status; VmHWM gives the kernel's peak RSS."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_anon_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
        return out

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, self.status().get("RssAnon", 0))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon_kb = max(self.peak_anon_kb, self.status().get("RssAnon", 0))


def run_child(job: dict, train_dir: Path, test_dir: Path) -> dict:
    import oodscope as ood
    from oodscope import Features

    with _MemoryMonitor() as mon:
        base_anon = mon.status().get("RssAnon", 0)
        train = Features.load(train_dir, mmap=True)
        test = Features.load(test_dir, mmap=True)
        det = ood.create(job["detector"], **job["params"])
        t0 = time.perf_counter()
        det.fit(train)
        t1 = time.perf_counter()
        scores = det.score(test)
        t2 = time.perf_counter()
        # the detector's own peak (fit + score), before the benchmark's recall check adds
        # its exact search over the bank
        result = {"fit_s": t1 - t0, "score_s": t2 - t1,
                  "peak_rss_fit_score_gb": mon.status()["VmHWM"] * 1024 / GB,
                  "peak_anon_fit_score_gb": max(mon.peak_anon_kb, mon.status().get("RssAnon", 0)) * 1024 / GB}
        result["fit_summary"] = det.fit_summary()
        is_id = test.labels >= 0
        if job.get("recall_sample"):
            # recall@k on test queries against exact search over the bank, ID and OOD apart
            # (the features only: test[mask] would copy the logits too)
            half = job["recall_sample"] // 2
            result["recall_id"] = det.recall_at_k(test.features[is_id], train, sample=half)
            result["recall_ood"] = det.recall_at_k(test.features[~is_id], train, sample=half)
            result["recall_s"] = time.perf_counter() - t2
    result["auroc"] = ood.metrics.auroc(scores[is_id], scores[~is_id])
    st = mon.status()
    result["peak_rss_gb"] = st["VmHWM"] * 1024 / GB
    result["peak_anon_gb"] = mon.peak_anon_kb * 1024 / GB
    result["baseline_anon_gb"] = base_anon * 1024 / GB
    return result


# ----------------------------------------------------------------------------- driver
def jobs_for(cfg: dict) -> list[dict]:
    return [
        {"label": "mahalanobis", "detector": "mahalanobis", "params": {}},
        {"label": "rmd", "detector": "rmds", "params": {}},
        {"label": "vim", "detector": "vim", "params": {}},
        {"label": f"knn exact, 1% bank, k={cfg['knn_k']}", "detector": "knn",
         "params": {"k": cfg["knn_k"], "subsample": 0.01, "index": "exact"}},
        # the full bank: IVF with float16 vectors (half the memory of float32), nprobe raised
        # at fit time until recall@k >= 0.99 on a held-out probe of the bank
        {"label": f"knn ivf fp16, full bank, k={cfg['ivf_k']}", "detector": "knn",
         "params": {"k": cfg["ivf_k"], "index": "ivf", "storage": "float16"},
         "recall_sample": cfg["recall_sample"]},
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small size (minutes) instead of ImageNet size")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the synthetic bank is written (default: /tmp/oodscope_scale_{quick,full})")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--only", default="", help="comma-separated job labels prefixes (e.g. 'mahalanobis,knn')")
    p.add_argument("--limit-gb", type=float, default=6.0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"(full: {value})")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    root = args.data_dir or Path(f"/tmp/oodscope_scale_{'quick' if args.quick else 'full'}")

    if args.child is not None:
        job = json.loads(args.child)
        res = run_child(job, root / "train", root / "test")
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    size_gb = cfg["n_train"] * cfg["dim"] * np.dtype(args.dtype).itemsize / GB
    print(f"[bank] {cfg['n_train']:,} x {cfg['dim']} {args.dtype} ({size_gb:.2f} GB), "
          f"{cfg['classes']} classes, {cfg['n_test']:,} test -> {root}", flush=True)
    t = time.perf_counter()
    make_bank(root, cfg["n_train"], cfg["dim"], cfg["classes"], cfg["n_test"], args.dtype)
    print(f"[bank] ready in {time.perf_counter() - t:.1f}s", flush=True)

    jobs = jobs_for(cfg)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        jobs = [j for j in jobs if any(j["label"].startswith(w) for w in wanted)]
    rows = []
    for job in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job), "--data-dir", str(root)]
        if args.quick:
            cmd.append("--quick")
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"label": job["label"], "error": err, "wall_s": wall})
        else:
            rows.append({"label": job["label"], "wall_s": wall, **json.loads(line[len("RESULT "):])})
        r = rows[-1]
        print(f"[{r['label']}] " + (r.get("error") or
              f"fit {r['fit_s']:.1f}s score {r['score_s']:.1f}s peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(anon {r['peak_anon_gb']:.2f} GB)"), flush=True)

    head = (f"{'detector':<34} {'fit s':>8} {'score s':>8} {'wall s':>7} {'fit+score RSS':>13} {'peak RSS GB':>11} "
            f"{'anon GB':>8} {'<= ' + format(args.limit_gb, 'g') + ' GB':>8} {'AUROC':>6} "
            f"{'recall probe/ID/OOD':>20}  search")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<34} failed: {r['error']}")
            continue
        own = r.get("peak_rss_fit_score_gb", r["peak_rss_gb"])
        own_anon = r.get("peak_anon_fit_score_gb", r["peak_anon_gb"])
        ok = "yes" if own <= args.limit_gb else ("anon" if own_anon <= args.limit_gb else "NO")
        summary = dict(r.get("fit_summary", {}))
        probe = next((v for k, v in summary.items() if k.startswith("recall@")), None)
        recall = "/".join("-" if v is None else f"{v:.3f}"
                          for v in (probe, r.get("recall_id"), r.get("recall_ood")))
        search = ", ".join(f"{k}={v}" for k, v in summary.items() if not k.startswith("recall@"))
        print(f"{r['label']:<34} {r['fit_s']:>8.1f} {r['score_s']:>8.1f} {r['wall_s']:>7.0f} "
              f"{own:>13.2f} {r['peak_rss_gb']:>11.2f} {r['peak_anon_gb']:>8.2f} {ok:>8} {r['auroc']:>6.3f} "
              f"{recall if 'recall_id' in r else '':>20}  {search}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print("\nwall s = the child process (start-up, loading, fit, score, recall check). fit+score RSS = "
          "VmHWM right after scoring (what the detector needs; '<= limit' judges it); peak RSS = "
          "VmHWM at the end, after the recall check's exact search over the bank (includes resident pages of the memory-mapped bank; streaming fits release them "
          "chunk by chunk); anon = peak RssAnon (memory the detector allocates). '<= limit': yes "
          "= total within limit, anon = only the anonymous part is, NO = neither. recall = "
          "recall@k measured at fit on held-out bank rows / on ID and OOD test queries against "
          "exact search.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
