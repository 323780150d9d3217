"""The KV cache: figures, and clearing it."""

from __future__ import annotations

from litestar import Controller, delete, get
from litestar.params import FromQuery

from serve.schemas import CacheFigures, CacheNode, CacheTree
from serve.services import AppStateDep, ServicesDep


async def _figures(app_state: AppStateDep, services: ServicesDep) -> CacheFigures:
    cache = services.stack.cache
    pool = services.replica_pool
    if pool is not None:  # serve --replicas: the caches are the replicas'
        stats = await app_state.off_loop(pool.cache_stats)
    else:
        stats = (await app_state.on_worker(cache.stats)).as_dict() if cache is not None else None
    worker = services.worker
    return CacheFigures(
        stats=stats,
        queue_depth=worker.queue_depth,
        in_flight=worker.in_flight,
        active=worker.active,
        worker_crashes=worker.crashes,
        worker_healthy=worker.healthy,
    )


class CacheController(Controller):
    path = "/v1/cache"
    tags = ["cache"]

    @get(summary="Cache figures: bytes per tier, hits, evictions; worker queue")
    async def figures(self, app_state: AppStateDep, services: ServicesDep) -> CacheFigures:
        return await _figures(app_state, services)

    @get("/tree", summary="The most-used cached prefixes as a tree (system prompt -> chunks)")
    async def tree(
        self, app_state: AppStateDep, services: ServicesDep, limit: FromQuery[int] = 24
    ) -> CacheTree:
        cache = services.stack.cache
        if cache is None:
            return CacheTree(nodes=[])
        limit = max(1, min(limit, 200))
        nodes = await app_state.on_worker(lambda: cache.top_paths(limit))
        tokenizer = services.stack.loaded.tokenizer

        def label(ids: list[int]) -> str:
            # Chunk entries (chunk reuse) start with a mark that is no token: say what they are.
            kind = "chunk entry: " if ids and ids[0] < 0 else ""
            text = " ".join(tokenizer.decode([i for i in ids if i >= 0]).split())
            return (kind + text)[:80]

        return CacheTree(
            nodes=[
                CacheNode(
                    **{k: v for k, v in n.items() if k != "label_ids"}, label=label(n["label_ids"])
                )
                for n in nodes
            ]
        )

    @delete(status_code=200, summary="Drop every cached prefix, from RAM and disk")
    async def clear(self, app_state: AppStateDep, services: ServicesDep) -> CacheFigures:
        cache = services.stack.cache
        if services.replica_pool is not None:
            await app_state.off_loop(services.replica_pool.clear_caches)
        elif cache is not None:
            await app_state.on_worker(cache.clear)
        return await _figures(app_state, services)
