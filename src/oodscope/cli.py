"""The ``oodscope`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when used, so ``oodscope --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("oodscope.demo", "offline demo: digits 0-5 as ID, 6-9 and noise as OOD, every detector"),
    "list": ("oodscope.listing", "table of every detector: what it needs, defaults, reference"),
    "train": ("oodscope.train.cli", "train a reference network (optionally with an OOD-aware objective)"),
    "bench": ("oodscope.bench.cli", "run a benchmark: extract once, tune on validation, report"),
    "fit": ("oodscope.commands.fit", "fit a detector and calibrate its threshold; save a guard"),
    "score": ("oodscope.commands.score", "score a feature file with a saved guard (CSV out)"),
    "serve": ("oodscope.commands.serve", "serve a saved guard over HTTP (FastAPI + uvicorn)"),
    "train-prompts": ("oodscope.vlm.cli", "tune CLIP prompts for OOD detection: LAPT, Local-Prompt, KR-NFT, CMA"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="oodscope",
        description="Out-of-distribution detection for any trained model.",
    )
    parser.add_argument("--version", action="version", version=f"oodscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_unavailable=f"`oodscope {name}` is not available in this install.")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"oodscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
