"""``oodscope score``: score a feature file with a saved guard, write a CSV.

    oodscope score guard/ --features new.npz --out scores.csv
    oodscope score guard/ --features new.npz --out scores.csv --ray auto   # on a Ray cluster
"""

from __future__ import annotations

import argparse
import sys

from .inputs import read_features
from .ray_option import add_ray_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("guard", metavar="GUARD", help="directory written by guard.save / oodscope fit")
    p.add_argument("--features", required=True, metavar="FILE", help="features to score")
    p.add_argument("--out", default=None, metavar="CSV",
                   help="output CSV (columns index, score, accept, p_value); default: stdout%(default).0s")
    add_ray_arguments(p, "score")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..guard import Guard

    guard = Guard.load(args.guard)
    features = read_features(args.features)
    if args.ray is not None:
        from ..distributed import score as ray_score

        out = ray_score(guard, features, address=args.ray, num_workers=args.ray_workers)
    else:
        out = guard.decide(features)
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
