"""Auth, limits, CORS, the full queue's 429 and client disconnects, on real servers."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY
from tests.serve.server import ServerThread


def test_auth_is_required_everywhere_but_health(server: ServerThread) -> None:
    base = server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for method, path in [
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/schema/openapi.json"),
        ("GET", "/v1/models"),
        ("GET", "/v1/cache"),
        ("DELETE", "/v1/cache"),
        ("GET", "/v1/documents"),
        ("POST", "/v1/ask"),
    ]:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
            r = httpx.request(method, f"{base}{path}", headers=headers, json={"question": "x"})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
    ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200


def test_body_and_prompt_limits(server: ServerThread) -> None:
    http = httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60)
    huge = "word " * (server.settings.max_body_bytes // 5 + 10)
    r = http.post("/v1/completions", json={"prompt": huge, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["message"]
    long_prompt = "cache tree " * 3000  # under the body limit, over the model's 4096 tokens
    r = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    assert r.status_code == 413, r.text
    assert "tokens" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 65})
    assert r.status_code == 422 and "at most 64" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["details"]


def test_cors_is_off_unless_configured(server: ServerThread, busy_server: ServerThread) -> None:
    preflight = {
        "Origin": "http://allowed.example",
        "Access-Control-Request-Method": "POST",
    }
    off = httpx.options(f"{server.base_url}/v1/ask", headers={**preflight, **server.headers})
    assert "access-control-allow-origin" not in off.headers
    on = httpx.options(f"{busy_server.base_url}/v1/ask", headers=preflight)
    assert on.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.get(f"{busy_server.base_url}/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def _burst(base_url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        body = {"prompt": "The cache keeps the keys and values", "max_tokens": max_tokens}
        return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)))


def test_full_queue_answers_429_with_retry_after(busy_server: ServerThread) -> None:
    responses = asyncio.run(_burst(busy_server.base_url, 24, 256))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_client_disconnect_cancels_its_generation(busy_server: ServerThread) -> None:
    http = httpx.Client(base_url=busy_server.base_url, timeout=120)
    body = {"prompt": "alpha beta gamma", "max_tokens": 1000, "stream": True}
    started = time.perf_counter()
    full = http.post("/v1/completions", json={**body, "stream": False}).json()
    full_s = time.perf_counter() - started
    if full["usage"]["completion_tokens"] < 900:
        pytest.skip("the random model stopped early; nothing long to cancel")
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)  # the stream has begun
    cut = time.perf_counter()  # the connection is closed: the server must notice and stop
    while http.get("/v1/cache").json()["in_flight"] and time.perf_counter() - cut < full_s:
        time.sleep(0.01)
    assert http.get("/v1/cache").json()["in_flight"] == 0
    assert time.perf_counter() - cut < full_s / 2


def test_metrics_count_requests_tokens_and_cache(busy_server: ServerThread) -> None:
    http = httpx.Client(base_url=busy_server.base_url, timeout=60)
    http.post("/v1/completions", json={"prompt": "metrics please", "max_tokens": 3})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 999_999_999})
    text = http.get("/metrics").text
    assert (
        'ragcache_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    )
    assert 'route="/v1/completions",status="422"' in text
    for name in (
        "ragcache_ttft_seconds_bucket",
        "ragcache_prompt_tokens_total",
        "ragcache_completion_tokens_total",
        "ragcache_cached_tokens_total",
        'ragcache_cache_bytes{tier="ram"}',
        'ragcache_cache_bytes{tier="disk"}',
        "ragcache_queue_depth",
    ):
        assert name in text, name
