"""``oodscope list``: every registered detector with its needs and defaults."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="only detectors of this family (module), e.g. logits, distance")
    p.add_argument("--wide", action="store_true", help="also show search spaces and references")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from .detectors import detector_info

    df = detector_info()
    if args.family:
        df = df[df["family"] == args.family]
    cols = ["name", "family", "requires", "fit_requires", "defaults"]
    if args.wide:
        cols += ["search_space", "reference"]
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 60, "display.width", 200):
        print(df[cols].to_string(index=False))
    print(f"\n{len(df)} detectors. Higher score = more in-distribution for every one.")
    for _, row in df[df["scoring"] != "per sample"].iterrows():
        print(f"{row['name']} is {row['scoring']}; reset() starts a new stream.")
    print("Every other detector scores each sample on its own (a batch = its rows one by one).")
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0
