"""What the app holds while it runs: the answering stack, the model worker, and how they load.

`AppState` is created by `create_app` and handed to handlers by dependency injection. Loading runs
on its own thread so the server answers /health (and /ready with 503) while the model loads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import anyio
from litestar.di import NamedDependency

from ragcache.answer import AnswerSettings
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.embedder import SentenceTransformerEmbedder
from ragcache.model_loader import LoadedModel
from ragcache.retrieve import RetrievalSettings
from ragcache.runtime import GenerationWorker, ModelWorker, WorkerSettings
from ragcache.settings import Settings
from ragcache.stack import Stack, StackOptions, build_stack
from ragcache.store import ChunkStore, StoreSettings, open_store, tokenizer_identity
from ragcache.store_location import StoreLocation
from ragcache.store_watch import StoreWatcher
from serve.batches import BatchManager
from serve.conversations import Conversations
from serve.errors import ServiceNotReadyError
from serve.metrics import Metrics
from serve.refresh import StoreRefresher
from serve.replicas import ReplicaDeployment, ReplicaPool, deploy_replicas, replica_pool
from serve.settings import ServeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Services:
    """The loaded parts. The worker owns MLX and the cache; everything else is shared read-only."""

    stack: Stack
    worker: GenerationWorker  # a ModelWorker, or the pool over Ray Serve replicas
    model_id: str
    db_dir: str  # the store's folder or URI as text (request handlers' DI types must be plain)
    uploads_dir: Path
    max_prompt_tokens: int
    default_max_tokens: int
    refresher: StoreRefresher | None = None
    replicas: ReplicaDeployment | None = None  # serve --replicas N: taken down on close
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def replica_pool(self) -> ReplicaPool | None:
        """The pool over Ray Serve replicas (serve --replicas), or None in-process."""
        return self.worker if isinstance(self.worker, ReplicaPool) else None

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request may give in `model`: the served model's id and its folder's name."""
        path = self.stack.loaded.path
        names = [self.model_id] + ([path.name] if path is not None else [])
        return tuple(dict.fromkeys(names))

    def close(self, timeout_s: float) -> None:
        """Let in-flight requests finish (up to `timeout_s`), then flush the KV disk tier."""
        if self.refresher is not None:
            self.refresher.stop()
        self.worker.stop(timeout_s)
        self.stack.close()
        if self.replicas is not None:
            self.replicas.close()


def _answer_settings(settings: ServeSettings) -> AnswerSettings:
    answer = AnswerSettings()
    policy = replace(answer.policy, mode=settings.answer_mode or answer.policy.mode)
    if settings.decline_below is not None:
        policy = replace(policy, decline_below=settings.decline_below)
    return replace(answer, policy=policy)


def build_services(settings: ServeSettings, core: Settings) -> Services:
    """Load the model and open (or create) the store, then start the worker (or, with
    `settings.replicas`, the model replicas on Ray Serve and the pool that routes to them).

    Raises the stack's errors: ModelNotFoundError, StoreError, ConfigError, RayClusterError.
    """
    if settings.replicas is not None:
        return build_front_services(settings, core)
    db_dir = settings.resolved_db_dir(core.home)
    _ensure_table(db_dir, settings.table)
    cache_settings = CacheSettings()
    if settings.cache_bytes is not None:
        cache_settings = replace(cache_settings, cache_bytes=settings.cache_bytes)
    options = StackOptions(
        db_dir=db_dir,
        table=settings.table,
        model=settings.model,
        cache=settings.cache,
        cache_dir=settings.cache_dir,
        cache_dir_off=not settings.disk_cache,
        cache_settings=cache_settings.validate(),
        retrieval=RetrievalSettings(max_k=settings.max_k),
        answer=_answer_settings(settings),
    )
    stack = build_stack(core, options)
    # Load the embedder now, not on the first question (~3-5 s of torch start-up here): /ready
    # then means a question is answered at full speed.
    stack.retriever.embedder.embed_query("ready")
    worker = ModelWorker(
        stack.engine, WorkerSettings(max_queue=settings.max_queue, max_batch=settings.max_batch)
    )
    worker.start()
    refresher = store_refresher(
        stack.store, stack.loaded, stack.cache, worker, settings.store_refresh_s
    )
    return _services(settings, core, stack, worker, refresher)


def _services(
    settings: ServeSettings,
    core: Settings,
    stack: Stack,
    worker: GenerationWorker,
    refresher: StoreRefresher,
    replicas: ReplicaDeployment | None = None,
) -> Services:
    context = stack.loaded.context_length
    uploads = settings.resolved_uploads_dir(core.home)
    uploads.mkdir(parents=True, exist_ok=True)
    return Services(
        stack=stack,
        worker=worker,
        model_id=stack.loaded.name,
        db_dir=str(settings.resolved_db_dir(core.home)),
        uploads_dir=uploads,
        max_prompt_tokens=min(settings.max_prompt_tokens or context, context),
        default_max_tokens=min(
            settings.default_max_tokens or core.generation.max_tokens, settings.max_tokens
        ),
        refresher=refresher,
        replicas=replicas,
    )


def build_front_services(settings: ServeSettings, core: Settings) -> Services:
    """The HTTP front of `serve --replicas N`: retrieval, ordering and prompts here (the model's
    weights only mapped, for its tokenizer and template), generation on the replicas."""
    from ragcache.ray_cluster import require_reachable

    if settings.ray_address:  # before the store exists or a model loads: a typo costs nothing
        require_reachable(settings.ray_address)
    db_dir = settings.resolved_db_dir(core.home)
    _ensure_table(db_dir, settings.table)
    options = StackOptions(
        db_dir=db_dir,
        table=settings.table,
        model=settings.model,
        cache=False,  # the replicas hold the caches
        retrieval=RetrievalSettings(max_k=settings.max_k),
        answer=_answer_settings(settings),
        lazy_model=True,
    )
    stack = build_stack(core, options)
    stack.retriever.embedder.embed_query("ready")
    deployed = deploy_replicas(settings, core)
    try:
        pool = replica_pool(deployed, settings, stack.engine.check_fits)
        # The front's own store view must follow other processes' commits (no KV to retire).
        refresher = store_refresher(stack.store, stack.loaded, None, pool, settings.store_refresh_s)
    except BaseException:
        deployed.close()  # nothing left running on the cluster for a front that never served
        stack.close()
        raise
    return _services(settings, core, stack, pool, refresher, deployed)


def store_refresher(
    store: ChunkStore,
    loaded: LoadedModel,
    cache: PrefixCache | None,
    worker: GenerationWorker,
    interval_s: float,
) -> StoreRefresher:
    """A started refresher that retires the KV of chunks other processes replaced in `store`
    (the single server's, and each replica's for its own cache)."""
    tokenizer = loaded.tokenizer

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def invalidate(spans: list[list[int]]) -> int:
        return worker.call(lambda: cache.invalidate(spans)) if cache is not None else 0

    own_id = tokenizer_identity(loaded.path) if loaded.path else ""
    watcher = StoreWatcher(store, tokenize, own_id)
    refresher = StoreRefresher(watcher, invalidate, interval_s)
    refresher.start()
    return refresher


def _ensure_table(db_dir: StoreLocation, table: str) -> None:
    # A fresh server starts with an empty table, so documents can be uploaded before any ingest.
    embedder = SentenceTransformerEmbedder()  # lazy: dim and identity come from its files
    if isinstance(db_dir, Path):
        db_dir.mkdir(parents=True, exist_ok=True)
    open_store(db_dir, StoreSettings(table=table), dim=embedder.dim, embedder_id=embedder.identity)


class AppState:
    """Everything one app instance holds; the single value handlers get through DI."""

    def __init__(
        self, settings: ServeSettings, core: Settings, services: Services | None = None
    ) -> None:
        self.settings = settings
        self.core = core
        self.metrics = Metrics()
        self._services = services
        self.load_error: str | None = None
        self._loader: threading.Thread | None = None
        self.prepare_limiter: anyio.CapacityLimiter | None = None  # made inside the event loop
        self.ingest_lock: anyio.Lock | None = None
        self.batches = BatchManager(settings.resolved_batches_dir(core.home), settings)
        self.conversations = Conversations()

    @property
    def services(self) -> Services:
        """The loaded services. Raises ServiceNotReadyError (503) while loading or after a failure."""
        if self._services is None:
            if self.load_error:
                raise ServiceNotReadyError(f"the service failed to load: {self.load_error}")
            raise ServiceNotReadyError(
                "the model and store are still loading", hint="retry shortly"
            )
        return self._services

    @property
    def ready(self) -> bool:
        return self._services is not None

    def start(self) -> None:
        """Called by the lifespan inside the event loop: make async primitives, start loading."""
        self.prepare_limiter = anyio.CapacityLimiter(self.settings.prepare_threads)
        self.ingest_lock = anyio.Lock()
        if self._services is None:
            self._loader = threading.Thread(target=self._load, name="ragcache-load", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        try:
            self._services = build_services(self.settings, self.core)
            log.info("ready: %s", self._services.model_id)
        except Exception as exc:  # reported by /ready; the server stays up to say why
            log.exception("loading failed")
            self.load_error = str(exc)

    def close(self) -> None:
        """Called by the lifespan on shutdown (off the event loop): wait for loading, cancel the
        batch jobs, stop the worker."""
        if self._loader is not None:
            self._loader.join()
        if self._services is not None:
            # Batch jobs first: cancelled, they stop submitting before the worker drains.
            self.batches.close(self.settings.shutdown_timeout_s)
            self._services.close(self.settings.shutdown_timeout_s)

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run blocking work (retrieval, store reads) on a worker thread, a few at a time."""
        return await anyio.to_thread.run_sync(fn, limiter=self.prepare_limiter)

    async def on_worker(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model worker's thread (it owns the cache), between its steps."""
        worker = self.services.worker
        return await anyio.to_thread.run_sync(worker.call, fn, limiter=self.prepare_limiter)


# What handlers declare to receive the app's state and the loaded services by injection.
AppStateDep = NamedDependency[AppState]
ServicesDep = NamedDependency[Services]
