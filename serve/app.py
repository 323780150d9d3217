"""`create_app`: the Litestar app, its lifespan, dependencies, limits and error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from litestar import Controller, Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import Message, Scope

from ragcache.settings import Settings, load_settings
from serve.auth import BearerAuthMiddleware
from serve.errors import EXCEPTION_HANDLERS
from serve.routes import CONTROLLERS, BatchesController, DocumentsController, static_router
from serve.services import AppState, Services
from serve.settings import ServeSettings


def create_app(
    settings: ServeSettings | None = None,
    core: Settings | None = None,
    services: Services | None = None,
) -> Litestar:
    """Build the app. Without `services`, its lifespan loads them on a thread at startup (so
    /health answers at once and /ready says when the model and store are loaded); on shutdown it
    lets in-flight requests finish and flushes the cache's disk tier.
    """
    settings = (settings or ServeSettings()).validate()
    state = AppState(settings, core or load_settings(), services)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            # Shielded: the server is stopping, but the worker must still drain and flush.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(state.close)

    async def count_response(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start":
            route = scope.get("path_template") or "unmatched"
            state.metrics.observe_response(
                str(scope.get("method", "")), str(route), message["status"]
            )

    def provide_services() -> Services:
        return state.services

    # The upload endpoints take files up to the upload limit; everything else the body limit.
    uploads: dict[type[Controller], type[Controller]] = {
        c: type(c.__name__, (c,), {"request_max_body_size": settings.max_upload_bytes})
        for c in (DocumentsController, BatchesController)
    }
    handlers: list = [uploads.get(c, c) for c in CONTROLLERS] + [static_router]
    middleware = [BearerAuthMiddleware(settings.api_key)] if settings.api_key else []
    return Litestar(
        route_handlers=handlers,
        dependencies={
            "app_state": Provide(lambda: state, sync_to_thread=False, use_cache=True),
            "services": Provide(provide_services, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=middleware,
        before_send=[count_response],
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins))
        if settings.cors_origins
        else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="ragcache", version="0.1.0", path="/schema"),
        state=State({"ragcache": state}),
        debug=False,
    )
