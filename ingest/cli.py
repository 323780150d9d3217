"""`ragcache ingest`: the command-line face of an ingest job (registered via entry point).

Exit status: 0 when every file was ingested or already current (files of kinds ingest never
reads, such as .css or .png met in a folder, are ignored and listed, not failures); EXIT_PARTIAL (5)
when the job finished but left out a file of a kind it reads (listed in the report); otherwise a
RagcacheError's exit_code: 2 bad flag, 3 model missing, 6 store unusable (e.g. a table made by
another schema version), EXIT_NO_INPUT (66) a PATH that does not exist (checked before the store
is opened, so no table is created), 75 another job is writing the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from ingest.chunker import ChunkSettings
from ingest.settings import IngestSettings
from ingest.sources import DEFAULT_EXCLUDES, SourceNotFoundError
from ragcache.embedder import EmbedderSettings
from ragcache.errors import ConfigError
from ragcache.settings import Settings

EXIT_PARTIAL = 5
EXIT_NO_INPUT = SourceNotFoundError.exit_code  # 66, EX_NOINPUT

_EPILOG = """\
exit status: 0 all ingested (files of kinds ingest does not read, e.g. .css, .png, are
ignored); 5 partial (some files or lines it reads were skipped, see the report); 2 bad arguments;
3 model missing; 6 store unusable (nothing in it was changed); 66 a PATH does not exist (checked
first: no store or table is created); 75 another job is writing the table.
Files that are not UTF-8 are decoded in the most plausible legacy code page and listed.
Formats: .txt .md .rst (.rst.txt) .html .pdf .jsonl (one {"text": ..., "id": ...} per line)."""


def register(subparsers: Any) -> None:
    """Add the `ingest` subcommand to the ragcache parser."""
    p = subparsers.add_parser(
        "ingest",
        help="load, chunk, embed and store documents (incremental; safe to rerun)",
        description="Ingest files, folders and globs into the LanceDB chunk store. Unchanged "
        "documents are skipped by content hash; a killed job is finished by rerunning it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, folder or glob ('docs/**/*.md')")
    p.add_argument(
        "--db",
        help="LanceDB folder or object-store URI (s3://bucket/prefix, gs://, az://; "
        "default: $RAGCACHE_HOME/db)",
    )
    p.add_argument("--table", default="chunks", help="table name (default: chunks)")
    p.add_argument("--sync", action="store_true", help="delete stored documents gone from PATHs")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip matching paths (repeat)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    defaults = IngestSettings()
    p.add_argument("--max-file-mb", type=float, default=defaults.max_file_bytes / 2**20)
    p.add_argument("--chunk-tokens", type=int, default=defaults.chunk.target_tokens)
    p.add_argument("--overlap-tokens", type=int, default=defaults.chunk.overlap_tokens)
    p.add_argument(
        "--batch", type=int, default=defaults.write_batch_chunks, help="chunks per commit"
    )
    p.add_argument(
        "--generator", help="model whose tokenizer counts tokens (default: RAGCACHE_MODEL)"
    )
    p.add_argument("--embedder", default="", help="sentence-transformers folder (default: bundled)")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: load/chunk as Ray Data tasks, embed in an actor pool "
        "(needs ragcache[ray]); planning and commits stay here (default: local)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster for --engine ray (host:6379, ray://host:10001, auto; "
        "default: a local cluster on this machine)",
    )
    p.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Run the job described by `args`; print the report; return the exit status."""
    from ingest.pipeline import JobSpec, run_job

    ingest_settings = _settings_from(args)
    spec = JobSpec(
        paths=tuple(args.paths),
        db_dir=args.db or settings.home / "db",
        table=args.table,
        sync=args.sync,
        excludes=(*DEFAULT_EXCLUDES, *args.exclude),
        generator=args.generator or settings.model.name,
        engine=args.engine,
        ray_address=args.address,
    )
    if args.address and args.engine != "ray":
        raise ConfigError("--address is for --engine ray", hint="add --engine ray")
    progress = not args.no_progress and sys.stderr.isatty()  # the bar is on stderr, JSON on stdout
    report = run_job(spec, settings.home, ingest_settings, progress=progress)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.summary())
    return EXIT_PARTIAL if report.partial else 0


def _settings_from(args: argparse.Namespace) -> IngestSettings:
    if args.chunk_tokens < 16 or not 0 <= args.overlap_tokens < args.chunk_tokens // 2:
        raise ConfigError(
            f"--chunk-tokens {args.chunk_tokens} / --overlap-tokens {args.overlap_tokens} do not work",
            hint="use --chunk-tokens >= 16 and an overlap under half of it",
        )
    if args.max_file_mb <= 0 or args.batch < 1:
        raise ConfigError("--max-file-mb and --batch must be positive")
    defaults = IngestSettings()
    return replace(
        defaults,
        chunk=ChunkSettings(target_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens),
        embedder=EmbedderSettings(model=args.embedder),
        max_file_bytes=int(args.max_file_mb * 2**20),
        write_batch_chunks=args.batch,
    )
