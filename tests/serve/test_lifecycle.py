"""`ragcache serve` as a process: SIGTERM lets in-flight streams finish and flushes the KV disk
tier, so a restarted server answers a repeated prompt from the cache; a missing model fails fast."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from ragcache.model_loader import LoadedModel
from tests.serve.server import free_port, serve_subprocess, wait_ready

PROMPT = "alpha beta gamma"  # the tiny model runs on for ~1000 tokens from this one


def _start(tiny_llama: LoadedModel, db: Path, kv: Path, port: int, *extra: str) -> subprocess.Popen:
    args = ["--model", str(tiny_llama.path), "--db", str(db), "--cache-dir", str(kv), *extra]
    proc = serve_subprocess([*args, "--port", str(port), "--max-tokens", "2048"])
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=180)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(proc.communicate()[0]) from None
    return proc


@pytest.mark.slow
def test_sigterm_drains_streams_and_a_restart_is_warm(
    tmp_path: Path, tiny_llama: LoadedModel, tiny_store: Path
) -> None:
    port, kv = free_port(), tmp_path / "kv"
    base = f"http://127.0.0.1:{port}"
    proc = _start(tiny_llama, tiny_store, kv, port)
    lines: list[str] = []
    began = threading.Event()

    def read_stream() -> None:
        body = {"prompt": PROMPT, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                began.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert began.wait(60)
    proc.send_signal(signal.SIGTERM)
    reader.join(120)
    out, _ = proc.communicate(timeout=120)
    # uvicorn re-raises the signal it handled once shutdown is done, so the status says SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), out
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]", data[-3:]
    assert any('"finish_reason":"' in line for line in data)  # it ran to its end, not cut
    assert any(kv.rglob("*")), "the disk tier was not flushed"

    proc = _start(tiny_llama, tiny_store, kv, port)
    try:
        again = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        usage = again.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0, usage
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


@pytest.mark.slow
def test_no_disk_cache_keeps_the_kv_in_ram_only(
    tmp_path: Path, tiny_llama: LoadedModel, tiny_store: Path
) -> None:
    """--no-disk-cache: a repeat is served from RAM, and nothing is written to the disk tier,
    even on shutdown."""
    port, kv = free_port(), tmp_path / "kv"
    base = f"http://127.0.0.1:{port}"
    proc = _start(tiny_llama, tiny_store, kv, port, "--no-disk-cache")
    try:
        body = {"prompt": PROMPT, "max_tokens": 2}
        httpx.post(f"{base}/v1/completions", json=body, timeout=120).raise_for_status()
        again = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] > 0, again
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert not any(kv.rglob("*")), sorted(kv.rglob("*"))


@pytest.mark.slow
def test_missing_model_exits_3_before_serving(tmp_path: Path) -> None:
    proc = serve_subprocess(["--model", str(tmp_path / "nope"), "--db", str(tmp_path / "db")])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "hint:" in out
