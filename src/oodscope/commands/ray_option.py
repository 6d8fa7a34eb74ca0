"""The ``--ray [ADDRESS]`` / ``--ray-workers N`` options shared by ``oodscope score`` and
``oodscope bench`` (the work itself is in `oodscope.distributed`)."""

from __future__ import annotations

import argparse


def add_ray_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"{what} on Ray workers (extra 'ray'): no ADDRESS or 'local' starts a local "
                        "Ray, 'auto' joins the cluster started with `ray start`")
    p.add_argument("--ray-workers", type=int, default=2, metavar="N",
                   help="Ray workers scoring in parallel (2 unless given)")
