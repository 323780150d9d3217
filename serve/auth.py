"""Optional bearer-token auth on every path but /health and the page (`/`, `/static/`), which
hold no data: the page asks for the token and sends it on every API call."""

from __future__ import annotations

import hmac

from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send


def _public(scope: Scope) -> bool:
    """/health (probes) and the page with its assets, which hold no data."""
    path = scope["path"]
    return path in ("/health", "/") or path.startswith("/static/")


class BearerAuthMiddleware(ASGIMiddleware):
    """Refuses requests whose `Authorization: Bearer <key>` is missing or wrong (401)."""

    scopes = (ScopeType.HTTP,)
    should_bypass_for_scope = staticmethod(_public)

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            raise NotAuthorizedException(
                "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        await next_app(scope, receive, send)
