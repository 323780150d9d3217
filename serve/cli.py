"""`ragcache serve`: run the HTTP service under uvicorn (registered via entry point)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ragcache.answer_policy import ANSWER_MODES
from ragcache.errors import ConfigError
from ragcache.settings import Settings
from serve.settings import ROUTINGS, ServeSettings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to the ragcache parser."""
    d = ServeSettings()
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (RAG answers, OpenAI-compatible completions, documents, metrics)",
        description="Serve the store and the model over HTTP. OpenAPI schema at /schema.",
    )
    p.add_argument("--host", default=d.host, help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--db",
        default=None,
        help="LanceDB folder or object-store URI (s3://bucket/prefix, gs://, az://; default: HOME/db)",
    )
    p.add_argument("--table", default=d.table)
    p.add_argument("--model", default=None, help="embedded name, model folder or hub id")
    p.add_argument("--no-cache", action="store_true", help="compute every prompt from scratch")
    p.add_argument("--cache-dir", type=Path, default=None, help="KV disk tier (default HOME/kv)")
    p.add_argument(
        "--no-disk-cache", action="store_true", help="keep the KV cache in RAM only (no disk tier)"
    )
    p.add_argument(
        "--cache-mb",
        type=int,
        default=None,
        help="KV RAM budget in MiB (per replica with --replicas; default: a quarter of free memory)",
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file holding the bearer token every request but /health must send",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow this origin (repeat); off by default",
    )
    p.add_argument("--max-body-kb", type=int, default=d.max_body_bytes // 1024)
    p.add_argument("--max-upload-mb", type=int, default=d.max_upload_bytes // (1 << 20))
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: model context")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap per request")
    p.add_argument(
        "--mode",
        choices=list(ANSWER_MODES),
        default=None,
        help="default answer mode of /v1/ask (default: extract; a request's `mode` overrides it)",
    )
    p.add_argument(
        "--decline-below",
        type=float,
        default=None,
        help="evidence score under which a question is declined (default: calibrated; 0: never)",
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="beyond: 429")
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s)
    p.add_argument(
        "--chunk-reuse",
        choices=("off", "epic"),
        default="off",
        help="epic: copy the KV of chunks computed in earlier prompts, recomputing each chunk's "
        "first tokens (faster prefill; answers close to, not the same as, exact); a request's "
        "chunk_reuse field overrides it",
    )
    p.add_argument(
        "--no-speculate",
        action="store_true",
        help="decode one token per step (default: greedy answers draft from the prompt and "
        "verify the draft in one pass; the tokens are the same)",
    )
    p.add_argument(
        "--store-refresh",
        type=float,
        default=d.store_refresh_s,
        help="seconds between checks for commits other processes (ingest jobs) made to the "
        "store; 0: never",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run the model as N Ray Serve replicas behind this server, each with its own KV "
        "cache and disk tier, requests routed by prompt-prefix affinity (needs ragcache[ray])",
    )
    p.add_argument(
        "--routing",
        choices=ROUTINGS,
        default=d.routing,
        help="how --replicas picks a replica: affinity (the replica most likely holding the "
        "prompt's prefix, balanced by load) or power-of-two (Ray Serve's default)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster for --replicas (auto or host:6379, run on a node of it; default: a local one)",
    )
    p.set_defaults(func=run_serve)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    api_key = None
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file: {exc.strerror}") from exc
    return ServeSettings(
        host=args.host,
        port=args.port,
        db_dir=args.db,
        table=args.table,
        model=args.model,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        disk_cache=not args.no_disk_cache,
        cache_bytes=args.cache_mb * (1 << 20) if args.cache_mb is not None else None,
        api_key=api_key,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_kb * 1024,
        max_upload_bytes=args.max_upload_mb * (1 << 20),
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        shutdown_timeout_s=args.shutdown_timeout,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        store_refresh_s=args.store_refresh,
        speculation="off" if args.no_speculate else "lookup",
        chunk_reuse=args.chunk_reuse,
        answer_mode=args.mode,
        decline_below=args.decline_below,
        replicas=args.replicas,
        routing=args.routing,
        ray_address=args.address,
    ).validate()


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Load the stack first (so a missing model fails with its exit code), then serve until
    SIGINT/SIGTERM; shutdown drains in-flight requests and flushes the KV disk tier."""
    import uvicorn

    from serve.app import create_app
    from serve.services import build_services

    serve = serve_settings(args)
    services = build_services(serve, settings)
    app = create_app(serve, settings, services)
    config = uvicorn.Config(
        app,
        host=serve.host,
        port=serve.port,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=int(serve.shutdown_timeout_s),
        lifespan="on",
    )
    on = f" on {serve.replicas} replicas ({serve.routing} routing)" if serve.replicas else ""
    print(
        f"ragcache: serving {services.model_id}{on} on http://{serve.host}:{serve.port}",
        flush=True,
    )
    uvicorn.Server(config).run()
    return 0
