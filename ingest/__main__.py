"""`python -m ingest ...`: the ingest command on its own, mapping errors to exit codes like
`ragcache` does (useful where the ragcache CLI is not installed)."""

from __future__ import annotations

import argparse
import logging
import sys

import ragcache  # noqa: F401  (optimized BLAS under MLX before anything imports mlx)
from ingest.cli import register
from ragcache.errors import RagcacheError
from ragcache.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, load_settings())
    except RagcacheError as exc:
        print(f"ragcache: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
