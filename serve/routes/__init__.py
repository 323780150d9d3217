"""One controller per concern. The batches endpoints (issue 7) add their controller to CONTROLLERS."""

from __future__ import annotations

from litestar import Controller

from serve.routes.ask import AskController
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
]

__all__ = ["CONTROLLERS", "DocumentsController"]
