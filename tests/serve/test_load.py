"""100 concurrent clients on a server with a small queue and a 2 MiB KV budget."""

from __future__ import annotations

import asyncio

import httpx

from tests.serve.load import run_load
from tests.serve.server import ServerThread


def test_hundred_clients_each_answered_or_refused_and_the_budget_holds(
    busy_server: ServerThread,
) -> None:
    result = asyncio.run(run_load(busy_server.base_url, clients=100))
    assert result.lost == 0, result.outcomes
    assert result.answered + result.refused == 100
    assert result.answered >= busy_server.settings.max_queue  # the queue was used, not just refused
    figures = httpx.get(f"{busy_server.base_url}/v1/cache").json()
    stats = figures["stats"]
    assert figures["in_flight"] == 0 and figures["queue_depth"] == 0  # nothing left behind
    assert stats["ram_bytes"] <= stats["budget_bytes"] == 2 << 20
    assert stats["peak_ram_bytes"] <= stats["budget_bytes"]
    assert stats["evictions"] > 0  # the budget was actually under pressure
