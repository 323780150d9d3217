"""The `ragcache` command line.

Subcommands from the outer packages (ingest/, serve/) arrive through the `ragcache.commands` entry
point group, so this package never imports them. A plugin exposes `register(subparsers)` and sets
`func=(args, settings) -> int` on each parser it adds. Errors map once to exit codes here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

import ragcache  # noqa: F401  (puts the optimized BLAS under MLX before anything imports mlx)
from ragcache.errors import RagcacheError
from ragcache.settings import Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragcache",
        description="Retrieval-augmented generation that never recomputes what it has already seen.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from ragcache import cli_commands

    cli_commands.register(sub)
    for ep in sorted(entry_points(group="ragcache.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken plugin must not take the core commands down
            print(f"ragcache: warning: command {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings: Settings = load_settings()
        return int(args.func(args, settings) or 0)
    except RagcacheError as exc:
        print(f"ragcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ragcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
