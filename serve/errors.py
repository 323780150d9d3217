"""Errors of the service, and the one place that turns exceptions into HTTP responses.

Every error body has the OpenAI shape `{"error": {"message", "type", "code", "hint", "details"}}`,
so the `openai` client and curl users read the same message. Statuses come from
`RagcacheError.http_status`; Litestar's own exceptions keep theirs, except body validation, which is
422 (the JSON parsed but does not fit the schema) to tell it from malformed JSON (400).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.types import ExceptionHandlersMap

from ragcache.errors import InvalidRequestError, RagcacheError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
}


class ServiceNotReadyError(RagcacheError):
    """The model or the store is still loading (or failed to load)."""

    http_status = 503


class LimitExceededError(InvalidRequestError):
    """A value is well-formed but over a limit this server is configured with."""

    http_status = 422


class NotFoundError(InvalidRequestError):
    http_status = 404


class UnknownModelError(NotFoundError):
    """A request names a model this server does not run (OpenAI answers 404 `model_not_found`)."""

    code = "model_not_found"


def error_response(
    status: int,
    message: str,
    code: str,
    hint: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "code": code,
            "hint": hint,
            "details": details,
        }
    }
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _ragcache_error(request: Request, exc: RagcacheError) -> Response:
    headers = None
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    elif exc.http_status == 503:
        headers = {"Retry-After": "5"}
    if exc.http_status == 503:  # busy or restarting: the truth is "retry", not a failure
        log.info("%s %s refused for now: %s", request.method, request.url.path, exc.message)
    elif exc.http_status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    code = getattr(exc, "code", None) or type(exc).__name__
    return error_response(exc.http_status, exc.message, code, exc.hint, None, headers)


def _http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        status = 422
    headers = dict(exc.headers or {})
    if isinstance(exc, NotAuthorizedException):
        headers.setdefault("WWW-Authenticate", "Bearer")
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
    return error_response(
        status, exc.detail, type(exc).__name__, None, exc.extra or None, headers or None
    )


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", type(exc).__name__)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    RagcacheError: _ragcache_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
