"""`ragcache batch QUESTIONS.jsonl -o ANSWERS.jsonl`: the command-line face of a batch job.

Exit status: 0 when every question has an answer line; 5 when the batch finished but some lines
got an error (bad lines, duplicate ids, failed questions: see the answers file); 130 when
interrupted (rerun the same command to finish); a RagcacheError's exit code otherwise (2 bad input
or unwritable output, 3 model missing, 4 documents longer than the context).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ragcache.order import ORDERS
from ragcache.settings import Settings

EXIT_PARTIAL = 5

_EPILOG = """\
input lines: {"id": "q1", "question": "..."} or the OpenAI Batch API shape
  {"custom_id": "q1", "body": {"messages": [{"role": "user", "content": "..."}]}}
output lines: {"id", "line", "answer", "citations", "usage", "finish_reason", "error": null}
  or {"id", "line", "error": {"type", "message"}}. Rerunning skips answered ids.
exit status: 0 all answered; 5 some lines got an error; 2 bad input or output path;
  4 documents longer than the model's context; 130 interrupted."""


def register(subparsers: Any) -> None:
    """Add the `batch` subcommand (func=(args, settings) -> int)."""
    p = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of questions (RAG, or long-context with --doc); resumable",
        description="Answer every question of QUESTIONS.jsonl into ANSWERS.jsonl, scheduled so "
        "that questions sharing a prompt prefix run together and reuse the KV cache.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("questions", type=Path, metavar="QUESTIONS.jsonl")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="ANSWERS.jsonl")
    p.add_argument(
        "--db",
        default=None,
        help="LanceDB folder or object-store URI (s3://bucket/prefix, gs://, az://; default: HOME/db)",
    )
    p.add_argument("--table", default="chunks")
    p.add_argument(
        "--doc",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="long-context mode: ask every question against these documents (repeatable)",
    )
    p.add_argument("--model", default=None, help="embedded name, model folder or hub id")
    p.add_argument("--max-tokens", type=int, default=None, help="per answer (default 256)")
    p.add_argument("--k", type=int, default=None, help="chunks to retrieve (RAG mode)")
    p.add_argument("--order", choices=list(ORDERS), default="cache", help="chunk order (RAG)")
    p.add_argument("--where", default=None, help="SQL filter on chunk columns (RAG)")
    p.add_argument(
        "--schedule",
        choices=["prefix", "fifo"],
        default="prefix",
        help="prefix: neighbours share the longest prefix (default); fifo: input order",
    )
    p.add_argument("--max-batch", type=int, default=8, help="questions decoded together")
    p.add_argument("--sequential", action="store_true", help="one question at a time, no worker")
    p.add_argument("--no-cache", action="store_true", help="compute every prompt from scratch")
    p.add_argument(
        "--no-disk-cache", action="store_true", help="keep the KV cache in RAM only (no HOME/kv)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--no-speculate",
        action="store_true",
        help="decode one token per step (default: greedy answers draft from their prompt)",
    )
    p.add_argument(
        "--chunk-reuse",
        choices=("off", "epic"),
        help="epic: copy the KV of chunks computed for earlier questions (their first tokens "
        "recomputed), close to but not the same as exact; off: exact prefix reuse only",
    )
    p.add_argument("--json-report", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    from ragcache.batch.job import BatchSettings
    from ragcache.batch.run import BatchOptions, run_batch
    from ragcache.errors import InvalidRequestError

    if args.max_batch < 1:
        raise InvalidRequestError(f"--max-batch must be >= 1, got {args.max_batch}")
    batch = BatchSettings(
        schedule=args.schedule,
        max_tokens=args.max_tokens or settings.generation.max_tokens,
        temperature=settings.generation.temperature,
        speculation="off" if args.no_speculate else settings.generation.speculation,
        chunk_reuse=args.chunk_reuse or settings.generation.chunk_reuse,
        progress=not args.no_progress,
    )
    options = BatchOptions(
        questions=args.questions,
        answers=args.output,
        docs=tuple(args.doc),
        db_dir=args.db,
        table=args.table,
        model=args.model,
        k=args.k,
        order=args.order,
        where=args.where,
        cache=not args.no_cache,
        cache_dir_off=args.no_disk_cache,
        worker=not args.sequential,
        max_batch=args.max_batch,
        batch=batch,
    )
    status = run_batch(settings, options)
    if args.json_report:
        print(json.dumps({"output": str(args.output), **status.as_dict()}))
    else:
        print(
            f"{status.answered} answered, {status.skipped} already answered, "
            f"{status.failed} failed, {status.input_errors} bad lines; token hit rate "
            f"{status.hit_rate:.0%}; {status.elapsed_s:.1f} s -> {args.output}",
            file=sys.stderr,
        )
    return EXIT_PARTIAL if status.failed or status.input_errors else 0
