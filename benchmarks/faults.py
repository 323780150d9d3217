"""Faults between the parts, each against a real `ragcache serve` and real processes.

    .venv/bin/python benchmarks/faults.py            # writes benchmarks/results/faults.json + .png

- `stale_read_s`: from the end of an `ragcache ingest` run in another process to the first
  /v1/ask that retrieves the new document (the worst of 3 documents; goal <= 2).
- `stale_answer_after_delete`: /v1/ask answers, asked from 2 s after another process's
  `ingest --sync` deleted a document, that still retrieve it (goal 0).
- `refresh_poll_ms`: what the server's store check costs when nothing changed.
- `shared_tier_lost_entries`: KV entries spilled by 3 processes sharing one disk tier (100
  requests between them) that are missing or unreadable afterwards (goal 0); a 4th process then
  restores from what they left.
- `worker_crash_recovered`, `requests_lost_silently`: a fault injected into the model worker of a
  running server (`RAGCACHE_FAILPOINTS`) while 8 requests run: each must end answered or with a
  retriable 503, /ready must go 503 then 200, and new requests must be answered.
- `load_lost_requests`: of 200 requests at 50 concurrent (4 waves), those neither answered nor
  refused with 429/503.
- `rss_growth_mb`: server RSS after 1,000 requests minus after the first 100, at a fixed 32 MiB
  KV budget.
- `runtime_overhead`: the single runtime (every request through the model worker) against the
  old direct path (mlx-lm's `generate_step` on the caller's thread), cold prompt, same process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import httpx  # noqa: E402

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from benchmarks.serve import start, stop  # noqa: E402
from tests.serve.load import run_load  # noqa: E402
from tests.serve.server import free_port, wait_ready  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "faults"
CORPUS = ROOT / "datasets" / "python_docs" / "faq" / "design"
FRUITS = [
    ("zebrafruit", "Zebrafruit trees are pruned every third spring by the orchard keeper Maren."),
    ("quillberry", "Quillberry bushes fruit only after a frost of at least minus four degrees."),
    ("ambernut", "Ambernut shells are cracked with a brass press invented in Oslo in 1911."),
]


# -- helpers -----------------------------------------------------------------------------------
def ingest(paths: list[Path], db: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "ingest", *map(str, paths), "--db", str(db), "--no-progress"]
    done = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"ingest failed ({done.returncode}): {done.stderr[-2000:]}")


def serve(db: Path, kv: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> tuple:
    port = free_port()
    cmd = [sys.executable, "-m", "ragcache.cli", "serve", "--db", str(db), "--model", MODEL]
    cmd += ["--cache-dir", str(kv), "--port", str(port), *extra]
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        proc = start(cmd, port, log)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, timeout_s=300)
    return proc, base


def ask_sources(http: httpx.Client, question: str) -> set[str]:
    r = http.post("/v1/ask", json={"question": question, "stream": False, "mode": "extract"})
    r.raise_for_status()
    return {s["doc_id"] for s in r.json()["sources"]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- 1. fresh reads ----------------------------------------------------------------------------
def fresh_reads(db: Path) -> dict[str, Any]:
    folder = WORK / "more"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    proc, base = serve(db, WORK / "kv-fresh", WORK / "serve-fresh.log", "--mode", "extract")
    http = httpx.Client(base_url=base, timeout=120)
    ask_sources(http, "warm up")  # measure staleness, not the first query's start-up
    waits = []
    try:
        for name, fact in FRUITS:
            (folder / f"{name}.md").write_text(f"# {name.title()}\n\n{fact}\n", encoding="utf-8")
            ingest([folder], db)
            committed = time.monotonic()
            question = f"What is true of {name}?"
            while not any(d.endswith(f"{name}.md") for d in ask_sources(http, question)):
                if time.monotonic() - committed > 30:
                    raise RuntimeError(f"{name} never became retrievable")
                time.sleep(0.05)
            waits.append(time.monotonic() - committed)
        # Delete one by a --sync run in another process, then keep asking.
        gone = FRUITS[0][0]
        (folder / f"{gone}.md").unlink()
        ingest([folder], db, "--sync")
        deleted = time.monotonic()
        stale_after_bound, seen_gone_s = 0, None
        question = f"What is true of {gone}?"
        while time.monotonic() - deleted < 5:
            still = any(d.endswith(f"{gone}.md") for d in ask_sources(http, question))
            if not still and seen_gone_s is None:
                seen_gone_s = time.monotonic() - deleted
            if still and time.monotonic() - deleted >= 2.0:
                stale_after_bound += 1
            time.sleep(0.1)
    finally:
        stop(proc)
    return {
        "stale_read_s": round(max(waits), 3),
        "stale_read_s_each": [round(w, 3) for w in waits],
        "stale_answer_after_delete": stale_after_bound,
        "delete_seen_s": round(seen_gone_s, 3) if seen_gone_s is not None else None,
        "refresh_interval_s": 1.0,
    }


def refresh_poll_cost(db: Path) -> float:
    from ragcache.store import open_store
    from ragcache.store_watch import StoreWatcher

    watcher = StoreWatcher(open_store(db), lambda text: [], "none")
    times = []
    for _ in range(50):
        t = time.perf_counter()
        watcher.poll()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


# -- 2. a shared disk tier ---------------------------------------------------------------------
def tier_prompts(tokenizer: Any, n: int, seed: int) -> list[Any]:
    """Prompts that share a system segment and draw 3 of 8 passages: many shared prefixes."""
    import random

    from ragcache.segments import encode_segments

    passages = [p.read_text()[:600] for p in sorted(CORPUS.glob("*.rst"))[:8]]
    rng = random.Random(seed)
    system = "You answer questions about Python from the passages below."
    out = []
    for i in range(n):
        chosen = rng.sample(passages, 3)
        out.append(encode_segments(tokenizer, [system, *chosen, f"Question {seed}-{i}?"]))
    return out


def tier_worker(tier: Path, index: int, n: int) -> None:
    """One of the processes sharing `tier`: run `n` requests, spill, report what it wrote."""
    from ragcache.cache import CacheSettings, PrefixCache
    from ragcache.engine import Engine
    from ragcache.model_loader import load_model
    from ragcache.sampling import SamplingParams
    from ragcache.settings import load_settings

    loaded = load_model(MODEL, load_settings().home)
    # A RAM budget of a few prompts: most nodes spill to the shared tier while others read it.
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=24 << 20, disk_dir=tier))
    engine = Engine(loaded, cache=cache)
    hits = 0
    for prompt in tier_prompts(loaded.tokenizer, n, seed=index % 2):  # two pairs overlap fully
        done = engine.generate(prompt, SamplingParams(max_tokens=2))
        hits += done.stats.cached_tokens > 0
    engine.close()  # flushes: every RAM node goes down to the tier too
    assert cache.disk is not None
    written = sorted(n.disk_ref.name for n in cache.tree.nodes() if n.on_disk and n.disk_ref)
    stats = cache.stats()
    print(json.dumps({"written": written, "errors": stats.disk_errors, "hits": hits,
                      "disk_reads": stats.disk_reads}))  # fmt: skip


def shared_tier(requests: int = 100) -> dict[str, Any]:
    from ragcache.cache import CacheSettings, PrefixCache
    from ragcache.engine import Engine
    from ragcache.model_loader import load_model
    from ragcache.sampling import SamplingParams
    from ragcache.settings import load_settings

    tier = WORK / "shared-kv"
    shutil.rmtree(tier, ignore_errors=True)
    shares = [requests // 3 + (1 if i < requests % 3 else 0) for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--tier-worker", str(tier), str(i), str(n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, n in enumerate(shares)
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"tier worker failed: {err[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    loaded = load_model(MODEL, load_settings().home)
    fourth = PrefixCache(loaded, CacheSettings(cache_bytes=256 << 20, disk_dir=tier))
    assert fourth.disk is not None
    present = {e.name for e in fourth.disk.entries()}
    written = set().union(*(set(r["written"]) for r in reports))
    lost = sorted(written - present)
    rebuilt = sum(1 for _ in fourth.tree.nodes())
    # The 4th process reuses them: the first prompt of worker 0 restores from disk, and its tokens
    # are those of a cold run.
    prompt = tier_prompts(loaded.tokenizer, 1, seed=0)[0]
    engine, cold = Engine(loaded, cache=fourth), Engine(loaded)
    warm = engine.generate(prompt, SamplingParams(max_tokens=4))
    same = warm.tokens == cold.generate(prompt, SamplingParams(max_tokens=4)).tokens
    engine.close()
    cold.close()
    return {
        "shared_tier_lost_entries": len(lost),
        "shared_tier_processes": 3,
        "shared_tier_requests": sum(shares),
        "shared_tier_entries_written": len(written),
        "shared_tier_entries_present": len(present),
        "shared_tier_disk_errors": sum(r["errors"] for r in reports),
        "shared_tier_disk_reads": sum(r["disk_reads"] for r in reports),
        "shared_tier_rebuilt_nodes_in_4th_process": rebuilt,
        "shared_tier_4th_process_cached_tokens": warm.stats.cached_tokens,
        "shared_tier_4th_process_same_tokens_as_cold": same,
    }


# -- 3. a worker crash, then load --------------------------------------------------------------
async def _ask_many(base: str, n: int, max_tokens: int) -> list[str]:
    """Outcome of `n` concurrent generated answers: "answered", "retriable" or "lost: ..."."""

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {
            "question": f"Why are Python strings immutable? ({i})",
            "stream": False,
            "mode": "generate",
            "max_tokens": max_tokens,
        }
        try:
            r = await http.post("/v1/ask", json=body)
        except httpx.HTTPError as exc:
            return f"lost: {type(exc).__name__}"
        if r.status_code == 200 and r.json().get("answer") is not None:
            return "answered"
        if r.status_code == 503 and r.headers.get("retry-after"):
            return "retriable"
        return f"lost: {r.status_code}"

    async with httpx.AsyncClient(base_url=base, timeout=180) as http:
        return await asyncio.gather(*(one(http, i) for i in range(n)))


def crash_and_load(db: Path) -> dict[str, Any]:
    proc, base = serve(
        db,
        WORK / "kv-crash",
        WORK / "serve-crash.log",
        "--mode",
        "generate",
        "--decline-below",
        "0",
        env={"RAGCACHE_FAILPOINTS": "worker.on_token=30"},  # once, mid-batch
    )
    try:
        outcomes = asyncio.run(_ask_many(base, 8, 12))
        t0 = time.monotonic()
        saw_503 = False
        while True:
            r = httpx.get(f"{base}/ready", timeout=10)
            saw_503 = saw_503 or r.status_code == 503
            if r.status_code == 200:
                break
            if time.monotonic() - t0 > 60:
                break
            time.sleep(0.02)
        after = asyncio.run(_ask_many(base, 4, 8))
        figures = httpx.get(f"{base}/v1/cache", timeout=30).json()
        crashes = {k: figures[k] for k in ("worker_crashes", "worker_healthy")}
        waves = [asyncio.run(run_load(base, 50, timeout_s=300)) for _ in range(4)]
    finally:
        stop(proc)
    lost_silently = sum(o.startswith("lost") for o in outcomes)
    recovered = (
        "retriable" in outcomes and all(o == "answered" for o in after) and lost_silently == 0
    )
    return {
        "worker_crash_recovered": int(recovered),
        "requests_lost_silently": lost_silently,
        "crash_outcomes": {o: outcomes.count(o) for o in set(outcomes)},
        "ready_503_seen_during_restart": saw_503,
        "after_crash_answered": after.count("answered"),
        "worker_figures": crashes,
        "load_lost_requests": sum(w.lost for w in waves),
        "load_requests": sum(w.clients for w in waves),
        "load_answered": sum(w.answered for w in waves),
        "load_refused": sum(w.refused for w in waves),
        "load_seconds": round(sum(w.seconds for w in waves), 1),
    }


# -- 4. memory over 1,000 requests -------------------------------------------------------------
async def _completions(base: str, start_at: int, n: int, clients: int = 4) -> None:
    words = [
        "cache",
        "prefix",
        "token",
        "radix",
        "tree",
        "window",
        "layer",
        "chunk",
        "store",
        "answer",
        "source",
        "quote",
    ]

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            for i in range(start_at + c, start_at + n, clients):
                prompt = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40))
                body = {"prompt": f"{i}: {prompt}", "max_tokens": 1}
                (await http.post("/v1/completions", json=body)).raise_for_status()

    await asyncio.gather(*(client(c) for c in range(clients)))


def memory(db: Path, requests: int = 1000) -> dict[str, Any]:
    proc, base = serve(db, WORK / "kv-mem", WORK / "serve-mem.log", "--cache-mb", "32")
    try:
        asyncio.run(_completions(base, 0, 100))
        warm = rss_mb(proc.pid)
        t = time.monotonic()
        asyncio.run(_completions(base, 100, requests - 100))
        end = rss_mb(proc.pid)
        cache = httpx.get(f"{base}/v1/cache", timeout=30).json()["stats"]
        seconds = time.monotonic() - t
    finally:
        stop(proc)
    return {
        "rss_growth_mb": round(end - warm, 1),
        "rss_after_100_mb": round(warm, 1),
        "rss_after_1000_mb": round(end, 1),
        "rss_requests": requests,
        "rss_cache_budget_mb": 32,
        "rss_cache_ram_mb_at_end": round(cache["ram_bytes"] / 2**20, 1),
        "rss_cache_evictions": cache["evictions"],
        "rss_seconds": round(seconds, 1),
    }


# -- 5. the single runtime against the old direct path -----------------------------------------
def runtime_overhead(rounds: int = 5) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from ragcache.engine import Engine
    from ragcache.model_loader import load_model
    from ragcache.sampling import SamplingParams
    from ragcache.segments import encode_segments
    from ragcache.settings import load_settings

    loaded = load_model(MODEL, load_settings().home)
    text = " ".join(p.read_text() for p in sorted(CORPUS.glob("*.rst"))[:3])[:1500]
    prompt = encode_segments(loaded.tokenizer, [text])
    n_out = 32
    params = SamplingParams(max_tokens=n_out, stop_loops=False)
    engine = Engine(loaded)
    eos = loaded.eos_token_ids

    def direct() -> tuple[float, list[int]]:
        t = time.perf_counter()
        cache = make_prompt_cache(loaded.model)
        out: list[int] = []
        steps = generate_step(mx.array(prompt.tokens), loaded.model, prompt_cache=cache)
        for token, _ in steps:
            if int(token) in eos:
                break
            out.append(int(token))
            if len(out) == n_out:
                break
        return time.perf_counter() - t, out

    def runtime() -> tuple[float, list[int]]:
        t = time.perf_counter()
        done = engine.generate(prompt, params)
        return time.perf_counter() - t, done.tokens

    direct(), runtime()  # warm both paths
    a, b = [], []
    for _ in range(rounds):
        ta, ya = direct()
        tb, yb = runtime()
        a.append(ta)
        b.append(tb)
    engine.close()
    same = ya == yb
    return {
        "runtime_overhead": round(statistics.median(b) / statistics.median(a) - 1, 4),
        "runtime_s_median": round(statistics.median(b), 3),
        "direct_s_median": round(statistics.median(a), 3),
        "runtime_prompt_tokens": len(prompt.tokens),
        "runtime_generated_tokens": n_out,
        "runtime_same_tokens_as_direct": same,
    }


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.bar(range(len(result["stale_read_s_each"])), result["stale_read_s_each"], color="tab:blue")
    ax.axhline(2.0, color="tab:red", ls="--", label="goal 2 s")
    ax.set_title("another process ingests: seconds until retrievable")
    ax.set_xlabel("document")
    ax.legend()
    ax = axes[1]
    labels = [
        "lost tier\nentries",
        "crash: lost\nsilently",
        "load: lost\nof 200",
        "stale after\ndelete",
    ]
    values = [
        result["shared_tier_lost_entries"],
        result["requests_lost_silently"],
        result["load_lost_requests"],
        result["stale_answer_after_delete"],
    ]
    ax.bar(labels, values, color="tab:green")
    ax.set_ylim(0, max(1, max(values)) * 1.2)
    ax.set_title("things lost (goal 0 each)")
    ax = axes[2]
    ax.bar(
        ["after 100", "after 1000"],
        [result["rss_after_100_mb"], result["rss_after_1000_mb"]],
        color="tab:purple",
    )
    ax.set_title(f"server RSS (MiB), KV budget {result['rss_cache_budget_mb']} MiB")
    fig.tight_layout()
    fig.savefig(RESULTS / "faults.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier-worker", nargs=3, metavar=("DIR", "INDEX", "N"))
    parser.add_argument(
        "--only", nargs="+", help="rerun these parts, keep the others' figures from the last run"
    )
    args = parser.parse_args()
    if args.tier_worker:
        tier_worker(Path(args.tier_worker[0]), int(args.tier_worker[1]), int(args.tier_worker[2]))
        return
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    db = WORK / "db"
    ingest([CORPUS], db)
    result: dict[str, Any] = {"machine": machine(), "model": MODEL}
    previous = RESULTS / "faults.json"
    if args.only and previous.exists():
        result = {**json.loads(previous.read_text()), **result}
        result["rerun_parts"] = args.only
    for name, part in [
        ("fresh reads", lambda: fresh_reads(db)),
        ("refresh cost", lambda: {"refresh_poll_ms": refresh_poll_cost(db)}),
        ("shared tier", shared_tier),
        ("crash and load", lambda: crash_and_load(db)),
        ("memory", lambda: memory(db)),
        ("runtime overhead", runtime_overhead),
    ]:
        if args.only and name not in args.only:
            continue
        t = time.monotonic()
        result.update(part())
        print(f"{name}: {time.monotonic() - t:.0f} s", flush=True)
    result["goals"] = {
        "stale_read_s <= 2": result["stale_read_s"] <= 2,
        "stale_answer_after_delete == 0": result["stale_answer_after_delete"] == 0,
        "shared_tier_lost_entries == 0": result["shared_tier_lost_entries"] == 0,
        "worker_crash_recovered == 1": result["worker_crash_recovered"] == 1,
        "requests_lost_silently == 0": result["requests_lost_silently"] == 0,
        "load_lost_requests == 0": result["load_lost_requests"] == 0,
        "runtime_overhead <= 0.02": result["runtime_overhead"] <= 0.02,
    }
    write_results("faults", result)
    plot(result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
