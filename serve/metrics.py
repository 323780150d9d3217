"""Prometheus metrics of one app: its own registry (no process-global state), fed by the handlers
and read at scrape time from the worker and the cache."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the route)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ragcache.engine import GenerationStats

# Time to first token spans ~10 ms (all cached, tiny model) to tens of seconds (cold, long prompt).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragcache_http_requests",
            "HTTP responses by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "ragcache_ttft_seconds",
            "Request arrival to first token",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("ragcache_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter(
            "ragcache_cached_tokens", "Prompt tokens restored from the KV cache", registry=r
        )
        self.completion_tokens = Counter(
            "ragcache_completion_tokens", "Tokens generated", registry=r
        )
        self.cache_bytes = Gauge(
            "ragcache_cache_bytes", "KV cache bytes per tier", ["tier"], registry=r
        )
        self.cache_budget = Gauge("ragcache_cache_budget_bytes", "KV cache RAM budget", registry=r)
        self.queue_depth = Gauge(
            "ragcache_queue_depth", "Requests waiting for the model worker", registry=r
        )
        self.in_flight = Gauge(
            "ragcache_requests_in_flight", "Requests queued or running in the worker", registry=r
        )

    def observe_generation(
        self, endpoint: str, stats: GenerationStats, ttft_s: float | None
    ) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.completion_tokens.inc(stats.generated_tokens)
        if ttft_s is not None:
            self.ttft.labels(endpoint).observe(ttft_s)

    def observe_response(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method, route, str(status)).inc()

    def render(self, cache_stats: Any | None, queue_depth: int, in_flight: int) -> bytes:
        """The exposition text, with the live gauges read now."""
        if cache_stats is not None:
            self.cache_bytes.labels("ram").set(cache_stats.ram_bytes)
            self.cache_bytes.labels("disk").set(cache_stats.disk_bytes)
            self.cache_budget.set(cache_stats.budget_bytes)
        self.queue_depth.set(queue_depth)
        self.in_flight.set(in_flight)
        return generate_latest(self.registry)
