"""Real Ray Serve replicas on one RAG request stream: prefix affinity against one replica and
against Ray Serve's default power-of-two routing (the live half of benchmarks/scale.py).

The store is the bundled Python FAQ; the stream is a Zipf-popular draw (exponent 1.0, fixed
seed) of its labelled questions, so popular questions repeat and questions of one FAQ page share
chunks. Each configuration gets a fresh Ray Serve application with empty KV caches (RAM and
disk tier) and the same stream, sent through the HTTP front (`/v1/ask`, k=4, 4 answer tokens)
by `clients` concurrent clients in stream order. A configuration's token hit rate is the
prompt tokens its replicas restored from their caches over all prompt tokens.

- `replica_hit_ratio`: 2 replicas with affinity / 1 replica;
- `affinity_vs_random_hit`: 2 replicas with affinity / 2 with power-of-two;
- `single_replica_vs_random_hit`: 1 replica / 2 with power-of-two, the ceiling of the ratio above
  while one replica's cache holds the whole stream (as here: no eviction).

Then the same three configurations on a chat stream (`conversation_stream`): a third of the
turns are follow-ups (`conversation` sent back), each continuing one of the most recently
started conversations with another question of the same FAQ page group, so its prompt extends
the conversation's cached path. A follow-up is sent once the turn before it is answered.
"""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.rag_workload import zipf_stream
from ingest.pipeline import JobSpec, run_job
from ragcache.datasets import load_dataset
from ragcache.settings import Settings, load_settings
from serve.services import build_services
from serve.settings import ServeSettings
from tests.serve.server import ServerThread, free_port

WORK = Path(__file__).resolve().parent / ".work" / "replicas"
CONFIGS = (
    ("1-replica", 1, "affinity"),
    ("2-affinity", 2, "affinity"),
    ("2-power-of-two", 2, "power-of-two"),
)


def faq_store(core: Settings, model: str) -> Path:
    """The Python FAQ in a LanceDB folder (incremental: a second run embeds nothing)."""
    corpus = load_dataset("python_docs").corpus_dir / "faq"
    db = WORK / "db"
    report = run_job(JobSpec(paths=(str(corpus),), db_dir=db, generator=model), core.home)
    print(f"store: {report.total_chunks} chunks ({report.elapsed_s:.0f} s)", flush=True)
    return db


@dataclass(frozen=True)
class Turn:
    question: str
    follows: int | None = None  # the stream index of the turn it follows up; None: a new chat


def zipf_questions(n: int, seed: int) -> list[Turn]:
    questions = list(load_dataset("python_docs").questions)
    return [Turn(q.question) for q in zipf_stream(questions, n, 1.0, seed)]


def conversation_stream(
    n: int, seed: int, follow_up_share: float = 1 / 3, active: int = 6
) -> list[Turn]:
    """`n` turns: new conversations open with a Zipf-popular FAQ question; `follow_up_share` of
    the turns continue one of the `active` most recently opened conversations with another
    question of the same FAQ page group (the FAQ's `section`). Deterministic for a seed."""
    questions = list(load_dataset("python_docs").questions)
    rng = random.Random(seed)
    rng.shuffle(questions)  # popularity rank independent of file order
    weights = [1.0 / (rank + 1) for rank in range(len(questions))]
    by_section: dict[str, list[str]] = defaultdict(list)
    for q in questions:
        by_section[q.section].append(q.question)
    opened: deque[int] = deque(maxlen=active)  # first turns of the conversations still going
    last_turn: dict[int, int] = {}
    section: dict[int, str] = {}
    turns: list[Turn] = []
    for i in range(n):
        if opened and rng.random() < follow_up_share:
            chat = rng.choice(list(opened))
            turns.append(Turn(rng.choice(by_section[section[chat]]), last_turn[chat]))
            last_turn[chat] = i
            continue
        q = rng.choices(questions, weights=weights, k=1)[0]
        turns.append(Turn(q.question))
        opened.append(i)
        last_turn[i], section[i] = i, q.section
    return turns


def run_config(
    core: Settings,
    db: Path,
    model: str,
    name: str,
    replicas: int,
    routing: str,
    stream: list[Turn],
    clients: int,
    k: int,
    cache_bytes: int | None = None,
) -> dict[str, Any]:
    """One configuration over the stream. `cache_bytes`: each replica's KV budget, in RAM only
    (no disk tier), for a stream whose working set one replica cannot hold."""
    kv = WORK / f"kv-{name}"
    shutil.rmtree(kv, ignore_errors=True)  # empty caches: no configuration starts warm
    settings = ServeSettings(
        port=free_port(),
        db_dir=db,
        model=model,
        cache_dir=kv,
        uploads_dir=WORK / "uploads",
        batches_dir=WORK / "batches",
        answer_mode="generate",
        decline_below=0.0,
        default_max_tokens=4,
        store_refresh_s=0.0,
        replicas=replicas,
        routing=routing,
        max_queue=16,
        cache_bytes=cache_bytes,
        disk_cache=cache_bytes is None,
    )
    started = time.perf_counter()
    services = build_services(settings, core)
    server = ServerThread(settings, core, services).start()
    ready_s = time.perf_counter() - started
    rows: list[dict[str, Any] | None] = [None] * len(stream)
    answered = [threading.Event() for _ in stream]
    chats: list[str] = [""] * len(stream)  # the conversation id each turn's answer returned
    next_index = iter(range(len(stream)))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def client() -> None:
        try:
            send()
        except BaseException as exc:  # a failed request must fail the run, not thin it
            failures.append(exc)
            for event in answered:  # nobody waits for a turn that will never come
                event.set()

    def send() -> None:
        with httpx.Client(base_url=server.base_url, timeout=600) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                turn = stream[i]
                body: dict[str, Any] = {
                    "question": turn.question,
                    "k": k,
                    "max_tokens": 4,
                    "stream": False,
                }
                if turn.follows is not None:  # taken in order, so it is answered or in flight
                    answered[turn.follows].wait()
                    body["conversation"] = chats[turn.follows]
                t0 = time.perf_counter()
                r = http.post("/v1/ask", json=body)
                r.raise_for_status()
                chats[i] = r.json()["conversation"]
                answered[i].set()
                usage = r.json()["usage"]
                rows[i] = {
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage["cached_tokens"],
                    "ttft_s": usage["ttft_s"],
                    "total_s": time.perf_counter() - t0,
                }

    t_stream = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_stream
    if failures:
        server.stop()
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]!r}")
    pool: Any = services.worker
    served = dict(pool.served_by)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        cache_stats = http.get("/v1/cache").json()["stats"]  # every replica's, summed
    server.stop()
    done = [r for r in rows if r is not None]
    prompt = sum(r["prompt_tokens"] for r in done)
    cached = sum(r["cached_tokens"] for r in done)
    per_replica = sorted(served.values(), reverse=True)
    return {
        "replicas": replicas,
        "routing": routing,
        "requests": len(done),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "mean_ttft_s": round(statistics.mean(r["ttft_s"] for r in done), 3),
        "mean_total_s": round(statistics.mean(r["total_s"] for r in done), 3),
        "stream_s": round(elapsed, 1),
        "start_s": round(ready_s, 1),
        "requests_per_replica": per_replica,
        "imbalance": round(per_replica[0] / (len(done) / replicas), 3) if per_replica else None,
        "cache_bytes": cache_bytes,
        "cache_ram_bytes": cache_stats.get("ram_bytes"),
        "evictions": cache_stats.get("evictions"),
        "disk_enabled": cache_stats.get("disk_enabled"),
    }


def live_replicas(
    model: str = "smollm2-135m-instruct",
    requests: int = 40,
    clients: int = 2,
    k: int = 4,
    seed: int = 0,
    bounded_share: float = 1 / 3,
) -> dict[str, Any]:
    """Every configuration over the same stream; the two ratios the issue names. Then the same
    three with each replica's KV budget `bounded_share` of the stream's working set (the RAM one
    replica held after the stream, measured in the first run), RAM only: the regime past one
    machine, where a corpus's prefixes outgrow one replica's cache."""
    from ragcache.ray_cluster import connect

    core = load_settings()
    db = faq_store(core, model)
    stream = zipf_questions(requests, seed)
    connect(None)  # one local cluster for every configuration (Serve restarts per config)
    out: dict[str, Any] = {
        "settings": {
            "model": model,
            "requests": requests,
            "clients": clients,
            "k": k,
            "seed": seed,
            "distinct_questions": len({t.question for t in stream}),
        },
    }
    for name, replicas, routing in CONFIGS:
        out[name] = run_config(core, db, model, name, replicas, routing, stream, clients, k)
        print(name, out[name], flush=True)
    one, aff, p2c = (out[name]["hit_rate"] for name, _, _ in CONFIGS)
    out["replica_hit_ratio"] = round(aff / one, 4) if one else None
    out["affinity_vs_random_hit"] = round(aff / p2c, 4) if p2c else None
    # What any router could reach on this stream: one replica holds every prefix it saw.
    out["single_replica_vs_random_hit"] = round(one / p2c, 4) if p2c else None
    working_set = out["1-replica"]["cache_ram_bytes"]
    budget = int(working_set * bounded_share)
    bounded: dict[str, Any] = {
        "working_set_bytes": working_set,
        "bounded_share": round(bounded_share, 4),
        "cache_bytes_per_replica": budget,
    }
    for name, replicas, routing in CONFIGS:
        bounded[name] = run_config(
            core, db, model, f"{name}-bounded", replicas, routing, stream, clients, k, budget
        )
        print(f"{name} bounded", bounded[name], flush=True)
    one, aff, p2c = (bounded[name]["hit_rate"] for name, _, _ in CONFIGS)
    bounded["replica_hit_ratio"] = round(aff / one, 4) if one else None
    bounded["affinity_vs_random_hit"] = round(aff / p2c, 4) if p2c else None
    out["memory_bound"] = bounded
    chat = conversation_stream(requests, seed)
    talk: dict[str, Any] = {
        "follow_ups": sum(t.follows is not None for t in chat),
        "distinct_questions": len({t.question for t in chat}),
    }
    for name, replicas, routing in CONFIGS:
        talk[name] = run_config(
            core, db, model, f"{name}-chat", replicas, routing, chat, clients, k
        )
        print(f"{name} chat", talk[name], flush=True)
    one, aff, p2c = (talk[name]["hit_rate"] for name, _, _ in CONFIGS)
    talk["replica_hit_ratio"] = round(aff / one, 4) if one else None
    talk["affinity_vs_random_hit"] = round(aff / p2c, 4) if p2c else None
    talk["single_replica_vs_random_hit"] = round(one / p2c, 4) if p2c else None
    out["conversations"] = talk
    return out
