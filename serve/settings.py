"""Settings of the HTTP service: one frozen dataclass with defaults (the CLI flags override them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragcache.errors import ConfigError
from ragcache.store_location import StoreLocation, normalise

MIB = 1 << 20
ROUTINGS = ("affinity", "power-of-two")  # how --replicas picks a replica (serve.replicas)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback: exposing the service is a deliberate choice
    port: int = 8000
    db_dir: StoreLocation | None = None  # a folder or an s3:// (gs://, az://) URI; default HOME/db
    table: str = "chunks"
    model: str | None = None  # default: the configured model
    cache: bool = True
    cache_dir: Path | None = None  # KV disk tier; default HOME/kv
    disk_cache: bool = True  # False: the KV cache lives in RAM only (no disk tier)
    cache_bytes: int | None = None  # RAM budget of the KV cache; default a quarter of free memory
    uploads_dir: Path | None = None  # uploaded files; default beside the db: DB-uploads
    batches_dir: Path | None = None  # one folder per batch job; default HOME/batches
    api_key: str | None = None  # bearer token required on everything but /health when set
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are listed
    max_body_bytes: int = 1 * MIB  # JSON requests
    max_upload_bytes: int = 16 * MIB  # POST /v1/documents and /v1/batches
    max_prompt_tokens: int | None = None  # default: the model's context window
    max_tokens: int = 2048  # the most a request may ask to generate
    default_max_tokens: int | None = None  # default: settings.generation.max_tokens
    max_k: int = 20  # chunks a request may retrieve
    answer_mode: str | None = None  # default: the core's; a request's `mode` overrides it
    decline_below: float | None = None  # evidence score under which questions are declined;
    # default: the calibrated AnswerPolicySettings value (0 never declines)
    max_question_chars: int = 4000
    prepare_threads: int = 4  # retrieval + prompt assembly run beside the worker, this many at once
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish
    # The model worker's (ragcache.runtime.WorkerSettings), kept here so the CLI need not import MLX.
    max_queue: int = 64  # requests waiting or running; beyond that: 429 with Retry-After
    max_batch: int = 8  # sequences decoded together
    # How often the server looks for commits other processes made to the store (ingest jobs);
    # 0 never looks. Cost when nothing changed: one manifest read (see benchmarks/faults.py).
    store_refresh_s: float = 1.0
    # Greedy answers draft from their prompt and verify in one pass (same tokens): "lookup" or
    # "off"; a request's `speculation` field overrides it (benchmarks/speculative.py).
    speculation: str = "lookup"
    # "off" (exact prefix reuse only) or "epic" (ragcache.cache.chunk_kv: copies chunk K/V,
    # close to but not the same as exact); a request's `chunk_reuse` field overrides it.
    chunk_reuse: str = "off"
    # Past one process (serve.replicas): run the model as this many Ray Serve replicas behind
    # this server (None: in this process). Each has its own KV cache and disk tier.
    replicas: int | None = None
    routing: str = "affinity"  # "affinity" (by prompt segments) or "power-of-two" (Serve's)
    ray_address: str | None = None  # a Ray cluster ("auto", "host:6379"); None: a local one
    replica_cpus: float = 1.0  # CPUs Ray reserves per replica

    def validate(self) -> ServeSettings:
        """Raise ConfigError on values the service cannot use; return self."""
        from ragcache.answer_policy import ANSWER_MODES

        if self.answer_mode is not None and self.answer_mode not in ANSWER_MODES:
            raise ConfigError(
                f"unknown answer mode {self.answer_mode!r}",
                hint="one of: " + ", ".join(ANSWER_MODES),
            )
        if self.chunk_reuse not in ("off", "epic"):
            raise ConfigError(f"unknown chunk reuse mode {self.chunk_reuse!r}", hint="off or epic")
        if self.decline_below is not None and not 0.0 <= self.decline_below <= 1.0:
            raise ConfigError(f"decline_below must be in [0, 1], got {self.decline_below}")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(
                f"the replica count must be >= 1, got {self.replicas}",
                hint="--replicas 2 runs two model replicas; leave it out to serve in-process",
            )
        if self.routing not in ROUTINGS:
            raise ConfigError(f"unknown routing {self.routing!r}", hint=" or ".join(ROUTINGS))
        if self.replicas is not None and (self.ray_address or "").startswith("ray://"):
            # Ray Client cannot hold the streaming handle the front relays answers through.
            raise ConfigError(
                "--replicas cannot use a Ray Client address (ray://)",
                hint="run the server on a node of the cluster with --address auto or host:6379",
            )
        if self.replica_cpus <= 0:
            raise ConfigError(f"replica_cpus must be > 0, got {self.replica_cpus}")
        if self.store_refresh_s < 0:
            raise ConfigError(f"store_refresh_s must be >= 0, got {self.store_refresh_s}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError(
                "the API key is shorter than 8 characters", hint="use a long random one"
            )
        positive = ("max_body_bytes", "max_upload_bytes", "max_tokens", "max_k", "prepare_threads")
        for name in (*positive, "max_queue", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def resolved_db_dir(self, home: Path) -> StoreLocation:
        return normalise(self.db_dir) if self.db_dir is not None else home / "db"

    def resolved_batches_dir(self, home: Path) -> Path:
        return self.batches_dir or home / "batches"

    def resolved_uploads_dir(self, home: Path) -> Path:
        db = self.resolved_db_dir(home)
        if self.uploads_dir is not None:
            return self.uploads_dir
        # Uploaded files are read from a local disk, wherever the store lives.
        return db.parent / f"{db.name}-uploads" if isinstance(db, Path) else home / "uploads"
