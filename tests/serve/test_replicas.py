"""`serve --replicas N`: the same HTTP API over Ray Serve model replicas, routed by prefix affinity.

One local Ray cluster with two replicas of the tiny llama serves every test here (Ray Serve takes
~15 s to start). The replicas are real processes: a killed one fails its stream with a
retriable error while the other answers, and Ray Serve replaces it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragcache.engine import Completion, TextDelta
from ragcache.errors import ConfigError
from ragcache.model_loader import LoadedModel
from ragcache.ray_cluster import connect
from ragcache.sampling import SamplingParams
from ragcache.settings import Settings
from serve.replica import ReplicaLostError
from serve.replicas import ReplicaPool
from serve.services import Services, build_services
from serve.settings import ServeSettings
from tests.serve.conftest import tiny_settings
from tests.serve.server import ServerThread

pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: LoadedModel,
    tiny_store: Path,
    core: Settings,
) -> Iterator[tuple[ServerThread, Services]]:
    tmp = tmp_path_factory.mktemp("replicas")
    import ray

    ours = not ray.is_initialized()
    connect(None, num_cpus=2)
    settings = tiny_settings(tiny_llama, tiny_store, tmp, replicas=2, max_tokens=2048)
    services = build_services(settings, core)
    server = ServerThread(settings, core, services).start()
    yield server, services
    server.stop()  # takes the replicas down with the app
    if ours:
        ray.shutdown()


def _pool(services: Services) -> ReplicaPool:
    assert isinstance(services.worker, ReplicaPool)
    return services.worker


def _ask(server: ServerThread, question: str, **extra: object) -> httpx.Response:
    body = {"question": question, "k": 3, "max_tokens": 4, "mode": "generate", "stream": False}
    body.update(extra)
    return httpx.post(f"{server.base_url}/v1/ask", json=body, headers=server.headers, timeout=60)


def test_the_front_serves_the_same_api_with_auth_and_a_repeat_is_a_cache_hit(
    front: tuple[ServerThread, Services],
) -> None:
    server, services = front
    assert httpx.get(f"{server.base_url}/ready", headers=server.headers).status_code == 200
    refused = httpx.post(
        f"{server.base_url}/v1/ask", json={"question": "alpha?", "stream": False}, timeout=30
    )
    assert refused.status_code == 401

    first = _ask(server, "What does the alpha document say?")
    assert first.status_code == 200, first.text
    again = _ask(server, "What does the alpha document say?")
    assert again.status_code == 200, again.text
    usage, usage_again = first.json()["usage"], again.json()["usage"]
    # Affinity sent the repeat where the first one's KV is: all but the last token restored.
    assert usage_again["prompt_tokens"] == usage["prompt_tokens"]
    assert usage_again["cached_tokens"] >= usage["prompt_tokens"] - 1
    assert again.json()["answer"] == first.json()["answer"]  # greedy, cached or not
    assert sum(_pool(services).served_by.values()) >= 2


def test_unrelated_questions_spread_and_a_conversation_sticks_to_its_replica(
    front: tuple[ServerThread, Services],
) -> None:
    server, services = front
    pool = _pool(services)
    answerer = services.stack.answerer
    replicas_used = set()
    for q in ("gamma facts", "delta notes", "epsilon details", "zeta summary"):
        prepared = answerer.prepare(q, 1, None, None, None, "generate")
        ticket = pool.submit(prepared.prompt, SamplingParams(max_tokens=2))
        assert isinstance(list(ticket.events(timeout=60))[-1], Completion)
        replicas_used.add(ticket.replica)
    assert len(replicas_used) == 2  # no shared prefix beyond the system prompt: load spreads

    homes = set()
    for q in ("alpha one", "beta two", "gamma three", "delta four"):
        prepared = answerer.prepare(q, 2, None, None, None, "generate")
        ticket = pool.submit(prepared.prompt, SamplingParams(max_tokens=2), conversation="c-1")
        list(ticket.events(timeout=60))
        homes.add(ticket.replica)
    assert len(homes) == 1

    # A follow-up over HTTP continues its conversation's KV path on the same replica.
    first = _ask(server, "Tell me about beta.")
    follow = _ask(server, "And more?", conversation=first.json()["conversation"])
    assert follow.status_code == 200, follow.text
    assert follow.json()["usage"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"] - 1


def test_cache_figures_and_clear_reach_every_replica(
    front: tuple[ServerThread, Services],
) -> None:
    server, _ = front
    _ask(server, "What does the gamma document say?")
    figures = httpx.get(f"{server.base_url}/v1/cache", headers=server.headers, timeout=60).json()
    stats = figures["stats"]
    assert len(stats["replicas"]) == 2  # one entry per replica, summed above them
    assert stats["lookups"] == sum(r["lookups"] for r in stats["replicas"]) > 0
    assert stats["ram_bytes"] > 0
    cleared = httpx.delete(f"{server.base_url}/v1/cache", headers=server.headers, timeout=60)
    assert cleared.status_code == 200
    assert all(r["ram_nodes"] == 0 for r in cleared.json()["stats"]["replicas"])


def test_a_replica_killed_mid_stream_fails_its_request_retriably_and_the_others_answer(
    front: tuple[ServerThread, Services],
) -> None:
    server, services = front
    pool = _pool(services)
    prepared = services.stack.answerer.prepare("alpha", 2, None, None, None, "generate")
    ticket = pool.submit(prepared.prompt, SamplingParams(max_tokens=1500))
    events = ticket.events(timeout=60)
    assert isinstance(next(events), TextDelta)
    assert ticket.replica is not None
    os.kill(pool.pids[ticket.replica], signal.SIGKILL)
    with pytest.raises(ReplicaLostError) as lost:
        for _ in events:
            pass
    assert lost.value.http_status == 503 and lost.value.retry_after_s >= 1

    # A client retries as told; the surviving replica (then the replacement) answers.
    deadline = time.monotonic() + 60
    while True:
        response = _ask(server, "What does the beta document say?")
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert "Retry-After" in response.headers
        assert time.monotonic() < deadline, "no replica answered after one was killed"
        time.sleep(1)
    assert pool.crashes >= 1


def test_bad_replica_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replica count must be >= 1"):
        ServeSettings(replicas=0).validate()
    with pytest.raises(ConfigError, match="unknown routing"):
        ServeSettings(replicas=2, routing="round-robin").validate()
    cli = subprocess.run(
        [sys.executable, "-m", "ragcache.cli", "serve", "--replicas", "0", "--db", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and "replica count must be >= 1" in cli.stderr


def test_an_unreachable_ray_address_is_reported_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragcache.cli",
            "serve",
            "--replicas",
            "2",
            "--address",
            "127.0.0.1:9",
        ]
        + ["--db", str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode != 0 and "nothing answers there" in cli.stderr, cli.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "db").exists()  # refused before the store was created
