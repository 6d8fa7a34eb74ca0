"""``oodscope serve``: serve a saved guard over HTTP (needs the ``serve`` extra).

    oodscope serve guard/ --host 127.0.0.1 --port 8000 --api-key-file key.txt
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS

    p.add_argument("guard", metavar="GUARD", help="directory written by guard.save / oodscope fit")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="file whose first line is the API key; requests without it get 401%(default).0s")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per request")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="request body limit in MiB")
    p.add_argument("--monitor-window", type=int, default=1000,
                   help="decisions kept for the drift monitor (/metrics)")


def run(args: argparse.Namespace) -> int:
    from ..serve import read_api_key, serve

    key = read_api_key(args.api_key_file) if args.api_key_file else None
    serve(args.guard, args.host, args.port, api_key=key, max_rows=args.max_rows,
          max_body_bytes=int(args.max_body_mb * 2**20), monitor_window=args.monitor_window)
    return 0
