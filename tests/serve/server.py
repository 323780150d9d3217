"""A real ragcache server on 127.0.0.1: uvicorn on its own thread (in-process) or `ragcache serve`
as a subprocess, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from ragcache.settings import Settings
from serve.app import create_app
from serve.services import Services
from serve.settings import ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/ready", headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = r.text
            if "failed" in last:
                break
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} not ready: {last}")


class ServerThread:
    """uvicorn serving `create_app(settings)` on a thread; `stop()` shuts it down gracefully."""

    def __init__(
        self, settings: ServeSettings, core: Settings, services: Services | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, core, services)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.base_url = f"http://127.0.0.1:{settings.port}"

    @property
    def headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def start(self) -> ServerThread:
        self.thread.start()
        wait_ready(self.base_url, self.headers)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def serve_subprocess(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`ragcache serve ARGS` with its output in a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "ragcache.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )
