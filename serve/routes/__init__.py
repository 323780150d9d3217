"""One controller per concern."""

from __future__ import annotations

from litestar import Controller

from serve.routes.ask import AskController
from serve.routes.batches import BatchesController
from serve.routes.cache import CacheController
from serve.routes.documents import DocumentsController
from serve.routes.health import HealthController
from serve.routes.openai import OpenAIController
from serve.routes.web import WebController, static_router

CONTROLLERS: list[type[Controller]] = [
    HealthController,
    AskController,
    OpenAIController,
    DocumentsController,
    CacheController,
    BatchesController,
    WebController,
]

__all__ = ["CONTROLLERS", "BatchesController", "DocumentsController", "static_router"]
