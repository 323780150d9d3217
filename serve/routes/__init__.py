"""One controller per concern."""

from __future__ import annotations

from litestar import Controller

from serve.routes.ask import AskController
from serve.routes.batches import BatchesController
from serve.routes.cache import CacheController
from serve.routes.documents import DocumentsController
from serve.routes.health import HealthController
from serve.routes.openai import OpenAIController

CONTROLLERS: list[type[Controller]] = [
    HealthController,
    AskController,
    OpenAIController,
    DocumentsController,
    CacheController,
    BatchesController,
]

__all__ = ["CONTROLLERS", "BatchesController", "DocumentsController"]
