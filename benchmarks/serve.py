"""Benchmark of the HTTP service, every figure measured in this run.

    .venv/bin/python benchmarks/serve.py            # ~12-15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/serve.py --quick    # small sizes, a smoke run

Writes benchmarks/results/serve.json and serve_ttft.png, serve_throughput.png:
- http_ttft_ratio_vs_mlx_lm_server: Zipf-popular questions of the labelled Python-docs FAQ set, k=5
  over the bundled corpus, sent over HTTP to `ragcache serve` (/v1/ask, streaming; retrieval runs
  in the server and counts in its time) and to `mlx_lm.server` (same model, prompt cache on, the
  same chunks in relevance order as a naive app sends them, retrieval done beforehand and not
  counted; started through `import ragcache` so it runs on the same OpenBLAS); mean client-side
  time to the first token, ragcache / mlx_lm.server. Goal <= 0.2.
- concurrent_throughput_gain: output tok/s of 8 concurrent chat clients over 1 client. Goal >= 3.
- load_lost_requests: 100 concurrent clients; requests neither answered nor refused (429). Must be 0.
- schemathesis_5xx: generated requests over the OpenAPI schema answered with a 5xx. Must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import httpx  # noqa: E402

from benchmarks.common import RESULTS, machine, mlx_lm_server_command, write_results  # noqa: E402
from benchmarks.rag_workload import zipf_stream  # noqa: E402  (the ask issue's stream)
from ingest.pipeline import JobSpec, run_job  # noqa: E402
from ragcache.datasets import load_dataset  # noqa: E402
from ragcache.model_loader import resolve_model_path  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.stack import StackOptions, build_stack  # noqa: E402
from tests.serve.fuzz import run_schemathesis  # noqa: E402
from tests.serve.load import run_load  # noqa: E402
from tests.serve.server import free_port, wait_ready  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def ragcache_serve(db: Path, kv: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ragcache.cli", "serve", "--db", str(db), "--model", MODEL]
    cmd += ["--cache-dir", str(kv), "--port", str(port), *extra]
    proc = start(cmd, port, log)
    wait_ready(f"http://127.0.0.1:{port}", timeout_s=300)
    return proc


def ttft_stream(url: str, body: dict, is_token: Callable[[str], bool]) -> tuple[float, str]:
    """Seconds from sending the request to the first SSE line that carries a token, and the last
    data line of the stream (read to its end: the next request must not overlap this one)."""
    t0 = time.perf_counter()
    ttft, last = None, ""
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if ttft is None and is_token(line):
                ttft = time.perf_counter() - t0
            if line.startswith("data: "):
                last = line[6:]
    if ttft is None:
        raise RuntimeError(f"no token from {url}")
    return ttft, last


def _ask_token(line: str) -> bool:
    return line.startswith("event: token")


def _mlx_token(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def throughput(
    base: str, clients: int, per_client: int, prompts: list[str], max_tokens: int
) -> dict:
    """Output tokens per second of `clients` concurrent chat clients, `per_client` requests each."""
    async with httpx.AsyncClient(base_url=base, timeout=900) as http:

        async def client(c: int) -> int:
            tokens = 0
            for i in range(per_client):
                q = prompts[(c * per_client + i) % len(prompts)]
                body = {
                    "messages": [{"role": "user", "content": f"Explain in detail: {q}"}],
                    "max_tokens": max_tokens,
                }
                r = await http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
            return tokens

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(client(c) for c in range(clients)))
        seconds = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": clients * per_client,
        "output_tokens": sum(counts),
        "seconds": round(seconds, 2),
        "tok_per_s": round(sum(counts) / seconds, 2),
    }


def plot(data: dict, ttft_ours: list[float], ttft_mlx: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(ttft_mlx, "o-", label="mlx_lm.server (relevance order, prompt cache)", alpha=0.8)
    ax.plot(ttft_ours, "o-", label="ragcache serve (/v1/ask)", alpha=0.8)
    ax.set_xlabel("request in the Zipf stream")
    ax.set_ylabel("time to first token over HTTP (s)")
    ax.set_yscale("log")
    ax.set_title(f"RAG stream, k=5: mean TTFT ratio {data['http_ttft_ratio_vs_mlx_lm_server']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_ttft.png", dpi=120)
    plt.close(fig)

    t = data["throughput"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(
        ["1 client", f"{t['many']['clients']} clients"],
        [t["one"]["tok_per_s"], t["many"]["tok_per_s"]],
    )
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"batched decode: x{data['concurrent_throughput_gain']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_throughput.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None, help="RAG stream length")
    args = parser.parse_args()
    quick = args.quick
    n_stream = args.requests or (8 if quick else 28)
    sizes = {
        "stream_requests": n_stream,
        "zipf_exponent": 1.0,
        "zipf_seed": 0,
        "k": 5,
        "ask_max_tokens": 8,
        "throughput_max_tokens": 24 if quick else 48,
        "throughput_one": {"clients": 1, "per_client": 2 if quick else 4},
        "throughput_many": {"clients": 8, "per_client": 1 if quick else 2},
        "load_clients": 100,
        "load_max_queue": 32,
        "schemathesis_max_examples": 3 if quick else 6,
    }
    core = load_settings()
    dataset = load_dataset()
    bench = core.home / "bench"
    db = bench / "serve-db"
    t0 = time.perf_counter()
    ingest = run_job(
        JobSpec(paths=(str(dataset.corpus_dir),), db_dir=db, generator=MODEL), core.home
    )
    print(f"store: {ingest.total_chunks} chunks ({time.perf_counter() - t0:.0f} s)", flush=True)

    stream = zipf_stream(
        list(dataset.questions), n_stream, sizes["zipf_exponent"], sizes["zipf_seed"]
    )
    questions = [q.question for q in stream]
    # The naive app's prompts: the same retrieval, chunks in relevance order, no cache.
    stack = build_stack(core, StackOptions(db_dir=db, model=MODEL, cache=False))
    texts = {
        q: stack.loaded.tokenizer.decode(stack.answerer.prepare(q, 5, "relevance").prompt.tokens)
        for q in dict.fromkeys(questions)
    }
    prompt_tokens = {q: len(stack.answerer.prepare(q, 5, "relevance").prompt.tokens) for q in texts}
    del stack

    work = Path(tempfile.mkdtemp(prefix="ragcache-bench-serve-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data: dict = {
        "machine": machine(),
        "model": MODEL,
        "sizes": sizes,
        "store_chunks": ingest.total_chunks,
    }

    # 1. ragcache serve: the RAG stream, then throughput, then the load run.
    proc = ragcache_serve(
        db, work / "kv", port, work / "ragcache.log", "--max-queue", str(sizes["load_max_queue"])
    )
    try:
        ours, cached = [], []
        for q in questions:
            body = {"question": q, "k": 5, "max_tokens": sizes["ask_max_tokens"]}
            ttft, done = ttft_stream(f"{base}/v1/ask", body, _ask_token)
            usage = json.loads(done)["usage"]
            ours.append(ttft)
            cached.append(usage["cached_tokens"] / usage["prompt_tokens"])
        cache = httpx.get(f"{base}/v1/cache").json()["stats"]
        print(f"ragcache stream: mean ttft {sum(ours) / len(ours):.3f} s", flush=True)
        faq = [q.question for q in dataset.questions]
        one = asyncio.run(
            throughput(
                base, 1, sizes["throughput_one"]["per_client"], faq, sizes["throughput_max_tokens"]
            )
        )
        many = asyncio.run(
            throughput(
                base,
                8,
                sizes["throughput_many"]["per_client"],
                faq[40:],
                sizes["throughput_max_tokens"],
            )
        )
        print(
            f"throughput: 1 client {one['tok_per_s']} tok/s, 8 clients {many['tok_per_s']} tok/s",
            flush=True,
        )
        load = asyncio.run(run_load(base, sizes["load_clients"], timeout_s=600))
        after_load = httpx.get(f"{base}/v1/cache").json()
        print(f"load: {load.outcomes} in {load.seconds} s", flush=True)
    finally:
        stop(proc)

    # 2. mlx_lm.server: the same stream, relevance-ordered prompts.
    model_path = resolve_model_path(MODEL, core.home)
    mlx_cmd = mlx_lm_server_command(model_path, port)
    mlx_cmd += ["--prompt-cache-size", "10", "--temp", "0.0"]
    proc = start(mlx_cmd, port, work / "mlx_lm.log")
    try:
        theirs = []
        for q in questions:
            body = {
                "prompt": texts[q],
                "max_tokens": sizes["ask_max_tokens"],
                "stream": True,
                "temperature": 0.0,
            }
            theirs.append(ttft_stream(f"{base}/v1/completions", body, _mlx_token)[0])
        print(f"mlx_lm.server stream: mean ttft {sum(theirs) / len(theirs):.3f} s", flush=True)
    finally:
        stop(proc)

    # 3. Schemathesis on a server over a scratch store (uploads would otherwise change the corpus).
    faq_files = sorted((dataset.corpus_dir / "faq" / "general").glob("q00*.rst"))[:3]
    run_job(
        JobSpec(paths=tuple(map(str, faq_files)), db_dir=work / "fuzz-db", generator=MODEL),
        core.home,
    )
    proc = ragcache_serve(
        work / "fuzz-db", work / "fuzz-kv", port, work / "fuzz.log", "--max-tokens", "8"
    )
    try:
        fuzz = run_schemathesis(base, None, sizes["schemathesis_max_examples"])
        print(f"schemathesis: {fuzz.requests} requests, statuses {fuzz.statuses}", flush=True)
    finally:
        stop(proc)

    mean_ours, mean_theirs = sum(ours) / len(ours), sum(theirs) / len(theirs)
    data.update(
        http_ttft_ratio_vs_mlx_lm_server=round(mean_ours / mean_theirs, 4),
        concurrent_throughput_gain=round(many["tok_per_s"] / one["tok_per_s"], 3),
        load_lost_requests=load.lost,
        schemathesis_5xx=len(fuzz.server_errors),
        goals={
            "http_ttft_ratio_vs_mlx_lm_server": "<= 0.2",
            "concurrent_throughput_gain": ">= 3",
            "load_lost_requests": "== 0",
            "schemathesis_5xx": "== 0",
        },
        ttft={
            "ragcache_mean_s": round(mean_ours, 4),
            "mlx_lm_server_mean_s": round(mean_theirs, 4),
            "ragcache_s": [round(x, 4) for x in ours],
            "mlx_lm_server_s": [round(x, 4) for x in theirs],
            "distinct_questions": len(texts),
            "ragcache_cached_fraction": [round(x, 3) for x in cached],
            "ragcache_mean_cached_fraction": round(sum(cached) / len(cached), 3),
            "mean_prompt_tokens": round(
                sum(prompt_tokens[q] for q in questions) / len(questions), 1
            ),
            "ragcache_cache_after_stream": cache,
        },
        throughput={"one": one, "many": many},
        load={
            "clients": load.clients,
            "answered": load.answered,
            "refused_429": load.refused,
            "lost": load.lost,
            "outcomes": load.outcomes,
            "seconds": load.seconds,
            "cache_after": after_load,
            "budget_held": after_load["stats"]["peak_ram_bytes"]
            <= after_load["stats"]["budget_bytes"],
        },
        schemathesis={
            "operations": fuzz.operations,
            "requests": fuzz.requests,
            "statuses": {str(k): v for k, v in sorted(fuzz.statuses.items())},
            "server_errors": fuzz.server_errors[:20],
        },
    )
    path = write_results("serve", data)
    plot(data, ours, theirs)
    print(json.dumps({k: data[k] for k in data["goals"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
