"""One model replica of `ragcache serve --replicas N`, and what crosses the wire to and from it.

A `ModelReplica` runs in its own Ray Serve replica process: a whole model worker (model, KV
tree, disk tier `HOME/kv/replica-<rank>`) plus a store watcher that retires the KV of chunks the
store replaced. It streams each `ReplicaRequest` back as a `ReplicaHello` (who serves it), the
worker's own events (TextDelta, then the Completion), or a `RemoteFailure` (a RagcacheError as
data, raised again on the front). The front's side is serve.replicas.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from ragcache.engine import Completion, TextDelta
from ragcache.errors import RagcacheError
from ragcache.runtime import WorkerSettings
from ragcache.runtime.worker import WorkerStoppedError
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.settings import Settings
from serve.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaRequest:
    """One generation as sent to a replica; `segments` and `conversation` are for the router."""

    prompt: SegmentedPrompt
    params: SamplingParams
    segments: tuple[tuple[str, int, bool], ...]  # ragcache.affinity Segments as tuples
    conversation: str | None = None


@dataclass(frozen=True)
class ReplicaHello:
    """The first item of every replica stream: who serves it (the pool counts it per replica)."""

    replica: str
    rank: int
    pid: int


@dataclass(frozen=True)
class RemoteFailure:
    """A RagcacheError a replica hit, sent as data: the front raises it as `ReplicaRequestError`
    with the same status, message, hint and Retry-After (exceptions with their own __init__ do
    not survive pickling through Ray intact)."""

    kind: str
    message: str
    hint: str | None
    http_status: int
    exit_code: int
    retry_after_s: float | None

    @classmethod
    def of(cls, exc: RagcacheError) -> RemoteFailure:
        return cls(
            type(exc).__name__,
            exc.message,
            exc.hint,
            exc.http_status,
            exc.exit_code,
            getattr(exc, "retry_after_s", None),
        )


class ReplicaRequestError(RagcacheError):
    """An error a replica reported for a request, with the replica's status and hint."""

    def __init__(self, failure: RemoteFailure) -> None:
        super().__init__(failure.message, failure.hint)
        self.code = failure.kind  # the error's own name on the wire, as the single server says
        self.http_status = failure.http_status
        self.exit_code = failure.exit_code
        if failure.retry_after_s is not None:
            self.retry_after_s = failure.retry_after_s


class ReplicaLostError(WorkerStoppedError):
    """The replica running this request went away (died, or was replaced); the others still
    answer and Ray Serve starts a new one, so the request can be sent again."""

    def __init__(self, cause: BaseException, retry_after_s: float = 1.0) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(
            f"the model replica serving this request went away ({type(cause).__name__}: "
            f"{first[:200]}); this request was not completed",
            hint=f"retry in {retry_after_s:.0f} s",
        )
        self.retry_after_s = retry_after_s


class ReplicaFailedError(RagcacheError):
    """A replica failed a request for a reason other than going away (a bug, a value that did
    not cross the wire): retrying would fail the same way, so this is a 500 with the cause."""

    def __init__(self, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(
            f"a model replica failed this request: {type(cause).__name__}: {first[:300]}"
        )


class ModelReplica:
    """One Ray Serve replica: a model worker with its own KV cache and disk tier."""

    def __init__(self, settings: ServeSettings, core: Settings) -> None:
        from ray import serve as ray_serve

        import ragcache  # noqa: F401  (the fast BLAS under MLX before anything imports mlx)
        from ragcache.cache import CacheSettings
        from ragcache.engine import Engine
        from ragcache.model_loader import load_model
        from ragcache.runtime import ModelWorker
        from ragcache.stack import StackOptions, build_cache
        from ragcache.store import StoreSettings, open_store
        from serve.services import store_refresher

        context = ray_serve.get_replica_context()
        rank: Any = context.rank  # a ReplicaRank (rank, node_rank, local_rank) in Ray >= 2.5x
        self.rank = int(getattr(rank, "rank", rank) or 0)
        self.name = context.replica_id.unique_id
        cache_settings = CacheSettings()
        if settings.cache_bytes is not None:
            cache_settings = replace(cache_settings, cache_bytes=settings.cache_bytes)
        # Its own disk tier: two replicas are two caches (the router keeps them apart).
        kv_dir = (settings.cache_dir or core.home / "kv") / f"replica-{self.rank}"
        options = StackOptions(
            model=settings.model,
            cache=settings.cache,
            cache_dir=kv_dir,
            cache_dir_off=not settings.disk_cache,
            cache_settings=cache_settings.validate(),
        )
        loaded = load_model(options.model or core.model.name, core.home, core.model.quant)
        cache = build_cache(loaded, core, options)
        engine = Engine(loaded, core.generation, cache)
        self.cache = cache
        self.worker = ModelWorker(
            engine, WorkerSettings(max_queue=settings.max_queue, max_batch=settings.max_batch)
        ).start()
        store = open_store(settings.resolved_db_dir(core.home), StoreSettings(table=settings.table))
        self.refresher = store_refresher(
            store, loaded, cache, self.worker, settings.store_refresh_s
        )
        self._shutdown_timeout_s = settings.shutdown_timeout_s
        log.info("replica %s (rank %d) ready: %s", self.name, self.rank, loaded.name)

    async def generate(
        self, request: ReplicaRequest
    ) -> AsyncIterator[ReplicaHello | TextDelta | Completion | RemoteFailure]:
        """The request's events: a ReplicaHello, TextDeltas, then its Completion (or a
        RemoteFailure). A caller that goes away cancels the generation here, and what it
        computed still goes into this replica's cache."""
        yield ReplicaHello(self.name, self.rank, os.getpid())
        try:
            ticket = self.worker.submit(request.prompt, request.params)
        except RagcacheError as exc:
            yield RemoteFailure.of(exc)
            return
        try:
            async for event in ticket.aevents():
                yield event
        except RagcacheError as exc:
            yield RemoteFailure.of(exc)

    def cache_stats(self) -> dict[str, Any] | None:
        """This replica's cache figures (CacheStats.as_dict), or None with the cache off."""
        cache = self.cache
        return self.worker.call(cache.stats).as_dict() if cache is not None else None

    def clear_cache(self) -> None:
        """Drop every cached prefix of this replica, from RAM and its disk tier."""
        cache = self.cache
        if cache is not None:
            self.worker.call(cache.clear)

    def check_health(self) -> None:
        """Ray Serve's health check: a stopped worker means a replica to replace. (A worker
        restarting after a crash is healthy here: it answers again in a moment.)"""
        if not self.worker.running:
            raise RuntimeError("the model worker is not running")

    def __del__(self) -> None:
        # Ray Serve's graceful shutdown: let running requests end, then flush the disk tier.
        refresher = getattr(self, "refresher", None)
        if refresher is not None:
            refresher.stop()
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(getattr(self, "_shutdown_timeout_s", 30.0))


__all__ = [
    "ModelReplica",
    "RemoteFailure",
    "ReplicaFailedError",
    "ReplicaHello",
    "ReplicaLostError",
    "ReplicaRequest",
    "ReplicaRequestError",
]
