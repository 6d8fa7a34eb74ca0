"""``oodscope score``: score a feature file with a saved guard, write a CSV.

    oodscope score guard/ --features new.npz --out scores.csv
"""

from __future__ import annotations

import argparse
import sys

from .inputs import read_features


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("guard", metavar="GUARD", help="directory written by guard.save / oodscope fit")
    p.add_argument("--features", required=True, metavar="FILE", help="features to score")
    p.add_argument("--out", default=None, metavar="CSV",
                   help="output CSV (columns index, score, accept, p_value); default: stdout%(default).0s")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..guard import Guard

    guard = Guard.load(args.guard)
    out = guard.decide(read_features(args.features))
    table = pd.DataFrame({"score": out["scores"], "accept": out["accept"],
                          "p_value": out["p_values"]})
    table.index.name = "index"
    if args.out:
        table.to_csv(args.out)
        status = guard.monitor(window=max(len(table), 1)).update(out["accept"])
        print(f"{len(table)} rows: {int(out['accept'].sum())} accepted, {len(table) - int(out['accept'].sum())} "
              f"rejected ({100 * status.rate:.2f}% vs {100 * status.expected_rate:.2f}% expected, "
              f"binomial p = {status.p_value:.3g}) -> {args.out}")
    else:
        table.to_csv(sys.stdout)
    return 0
