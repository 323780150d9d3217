"""The KV cache: figures, and clearing it."""

from __future__ import annotations

from litestar import Controller, delete, get

from serve.schemas import CacheFigures
from serve.services import AppStateDep, ServicesDep


async def _figures(app_state: AppStateDep, services: ServicesDep) -> CacheFigures:
    cache = services.stack.cache
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

    @delete(status_code=200, summary="Drop every cached prefix, from RAM and disk")
    async def clear(self, app_state: AppStateDep, services: ServicesDep) -> CacheFigures:
        cache = services.stack.cache
        if cache is not None:
            await app_state.on_worker(cache.clear)
        return await _figures(app_state, services)
