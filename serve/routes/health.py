"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from litestar import Controller, MediaType, Response, get
from litestar.openapi import ResponseSpec

from serve.metrics import CONTENT_TYPE_LATEST
from serve.schemas import Health, Readiness
from serve.services import AppStateDep


class HealthController(Controller):
    tags = ["health"]

    @get("/health", summary="Alive (never needs auth)")
    async def health(self) -> Health:
        return Health(status="ok")

    @get(
        "/ready",
        summary="Model and store loaded",
        responses={503: ResponseSpec(Readiness, description="still loading, or failed to load")},
    )
    async def ready(self, app_state: AppStateDep) -> Response[Readiness]:
        if not app_state.ready:
            reason = f"failed: {app_state.load_error}" if app_state.load_error else "loading"
            return Response(Readiness(ready=False, reason=reason), status_code=503)
        services = app_state.services
        worker = services.worker
        if not worker.healthy:
            reason = "model worker stopped"
            if worker.crashes:
                reason = (
                    f"model worker restarting after crash {worker.crashes}: {worker.last_crash}"
                )
            return Response(
                Readiness(ready=False, model=services.model_id, reason=reason),
                status_code=503,
                headers={"Retry-After": "1"},
            )
        chunks = await app_state.off_loop(services.stack.store.count)
        return Response(Readiness(ready=True, model=services.model_id, chunks=chunks))

    @get("/metrics", summary="Prometheus metrics", media_type=MediaType.TEXT)
    async def metrics(self, app_state: AppStateDep) -> Response[bytes]:
        stats, depth, in_flight = None, 0, 0
        if app_state.ready:
            services = app_state.services
            cache = services.stack.cache
            if cache is not None:
                stats = await app_state.on_worker(cache.stats)
            depth, in_flight = services.worker.queue_depth, services.worker.in_flight
        body = app_state.metrics.render(stats, depth, in_flight)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
