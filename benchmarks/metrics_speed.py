"""Time `oodscope.metrics.evaluate` on 10^6 ID + 10^6 OOD scores, before vs after.

    python benchmarks/metrics_speed.py                  # compare with the git revision below
    python benchmarks/metrics_speed.py --before REV     # any other revision
    python benchmarks/metrics_speed.py --n 100000 --boot 50

"before" is ``src/oodscope/metrics.py`` as it was at ``--before`` (read with ``git show``,
so run it inside the repository; without git only the current code is timed). "after"
is the installed ``oodscope.metrics``. Both get the same continuous scores (no ties) and
the same heavily tied scores (integers 0..99); each cell is the best of ``--repeat`` runs
in seconds, since on a shared machine the minimum is the least disturbed measurement.
The ``max |diff|`` column checks that the two versions give the same numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

#: The last revision with the per-metric implementation (one sort or rank per metric).
BEFORE = "5ccb700"


def _old_metrics(rev: str) -> types.ModuleType | None:
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "show", f"{rev}:src/oodscope/metrics.py"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"(no 'before' column: cannot read metrics.py at {rev}: {err})", file=sys.stderr)
        return None
    mod = types.ModuleType("oodscope_metrics_before")
    exec(compile(src, f"metrics.py@{rev}", "exec"), mod.__dict__)
    return mod


def _best(fn, repeat: int) -> tuple[float, float, dict]:
    """Best wall-clock and best CPU seconds over ``repeat`` runs (CPU time is what a loaded
    machine disturbs least)."""
    best, best_cpu, out = float("inf"), float("inf"), {}
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10**6, help="ID and OOD sample count each (default 10^6)")
    p.add_argument("--boot", type=int, default=20, help="bootstrap resamples for the ci=True row")
    p.add_argument("--boot-n", type=int, default=10**5, help="sample count each for the ci=True row")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' metrics.py")
    args = p.parse_args(argv)

    from oodscope import metrics as after

    before = _old_metrics(args.before)
    rng = np.random.default_rng(0)
    cases = {
        "continuous": (rng.normal(1, 1, args.n), rng.normal(0, 1, args.n)),
        "tied (100 values)": (rng.integers(10, 100, args.n).astype(float), rng.integers(0, 90, args.n).astype(float)),
    }
    small = (cases["continuous"][0][: args.boot_n], cases["continuous"][1][: args.boot_n])
    jobs = [(f"evaluate, {name}, {args.n:.0e}+{args.n:.0e}", ab, {}) for name, ab in cases.items()]
    jobs.append((f"evaluate(ci=True, n_boot={args.boot}), {args.boot_n:.0e}+{args.boot_n:.0e}", small,
                 {"ci": True, "n_boot": args.boot}))

    header = (f"{'case':<52} {'before s':>9} {'after s':>9} {'after cpu':>9} {'speed-up':>9} "
              f"{'max |diff|':>11}")
    print(header)
    print("-" * len(header))
    for label, (a, b), kw in jobs:
        t_after, cpu_after, r_after = _best(lambda: after.evaluate(a, b, **kw), args.repeat)
        if before is None:
            print(f"{label:<52} {'-':>9} {t_after:>9.3f} {cpu_after:>9.3f} {'-':>9} {'-':>11}")
            continue
        t_before, _, r_before = _best(lambda: before.evaluate(a, b, **kw), args.repeat)
        diff = max(abs(r_before[k] - r_after[k]) for k in r_before)
        print(f"{label:<52} {t_before:>9.3f} {t_after:>9.3f} {cpu_after:>9.3f} "
              f"{t_before / t_after:>8.1f}x {diff:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
