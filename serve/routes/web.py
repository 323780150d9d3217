"""The page at `/`: one HTML file and its script and styles, shipped inside the package.

The page and its assets hold no data, so they load without the API token; every call the page
makes goes through the API with the token the page asks for (kept in the tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, MediaType, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

WEB_DIR = Path(__file__).resolve().parents[1] / "web"


class WebController(Controller):
    include_in_schema = False

    @get("/", media_type=MediaType.HTML)
    async def page(self) -> Response[bytes]:
        return Response(
            (WEB_DIR / "index.html").read_bytes(),
            media_type=MediaType.HTML,
            headers={"Cache-Control": "no-cache"},
        )


static_router = create_static_files_router(
    path="/static",
    directories=[WEB_DIR],
    cache_control=CacheControlHeader(no_cache=True),
)
