"""The RAG workload: chunk orders vs reuse, time to first token, mlx_lm.server, answer quality.

A Zipf-popular stream of labelled questions (exponent 1.0, fixed seed; popular questions repeat,
as in real traffic) with k=5 over the bundled corpus. Every figure below comes from this run:

- per order (cache, relevance, canonical): token hit rate, mean/p50/p90 TTFT, total time, each
  order with a fresh, unbounded prefix cache;
- `order_reuse_vs_oracle`: tokens `cache` order reused / the best permutation of the same chunks
  for the same cache contents (all 120 orders tried against the tree before each request);
- `order_reuse_vs_relevance`: tokens reused by `cache` order / by `relevance` order;
- `reuse_upper_bound`: oracle-reusable tokens / all prompt tokens (unlimited cache);
- `ttft_ratio_vs_mlx_lm_server`: our mean TTFT / mlx_lm.server's on the same prompts (relevance
  order, as a naive app sends them; its own prompt cache on; the same retrieval time added);
- `ttft_vs_floor`: our mean TTFT / (retrieval + prefill of the tokens the oracle could not reuse +
  one decode step, at this machine's rates measured here);
- `quality_delta_points`: log-likelihood accuracy (gold answer vs 3 other answers) with the orders
  `cache` produced minus with relevance order, in points; plus exact match / F1 of short answers.

    .venv/bin/python benchmarks/rag_workload.py [--requests 200] [--quality-questions 30]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from benchmarks.common import machine, mlx_lm_server_command, write_results  # noqa: E402
from ragcache.answer import Answerer, AnswerSettings  # noqa: E402
from ragcache.cache import CacheSettings, PrefixCache  # noqa: E402
from ragcache.datasets import LabelledQuestion, load_dataset  # noqa: E402
from ragcache.embedder import SentenceTransformerEmbedder  # noqa: E402
from ragcache.engine import Engine  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.retrieve import Retriever  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.segments import SegmentedPrompt  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.store import open_store  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work"
ORDERS = ("cache", "relevance", "canonical")


def build_store(home: Path, model: str) -> Path:
    """The bundled corpus in a LanceDB folder (incremental: a second run embeds nothing)."""
    from ingest.pipeline import JobSpec, run_job

    db = WORK / "db"
    report = run_job(
        JobSpec(paths=(str(load_dataset().corpus_dir),), db_dir=db, generator=model), home
    )
    print(f"store: {report.total_chunks} chunks ({report.elapsed_s:.0f} s)", flush=True)
    return db


def zipf_stream(questions: list[LabelledQuestion], n: int, exponent: float, seed: int) -> list:
    rng = random.Random(seed)
    ranked = list(questions)
    rng.shuffle(ranked)  # popularity rank independent of file order
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=n)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def oracle_reuse(answerer: Answerer, prepared, tree) -> int:
    """Most tokens any order of the same chunks could restore from the tree as it is now."""
    best = 0
    for perm in itertools.permutations(prepared.chunks):
        tokens = answerer.builder.build(list(perm), prepared.question).tokens
        best = max(best, min(tree.match(tokens).prefix_len, len(tokens) - 1))
    return best


def run_order(
    loaded, retriever: Retriever, order: str, stream: list, oracle: bool, beside=None
) -> dict:
    """Run the stream with one chunk order and a fresh, unbounded cache. `beside(i, q)` runs
    after each request: the mlx_lm.server baseline, interleaved so both see the same load."""
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=16 << 30, disk_dir=None))
    engine = Engine(loaded, cache=cache)
    answerer = Answerer(engine, retriever, AnswerSettings(order=order))
    params = SamplingParams(max_tokens=1)
    rows = []
    start_all = time.perf_counter()
    for q in stream:
        t0 = time.perf_counter()
        prepared = answerer.prepare(q.question, 5, order)
        best = oracle_reuse(answerer, prepared, cache.tree) if oracle else None
        done = engine.generate(prepared.prompt, params)
        ttft = (prepared.retrieval_ms + prepared.order_ms) / 1000 + done.stats.ttft_s
        rows.append(
            {
                "id": q.id,
                "prompt_tokens": done.stats.prompt_tokens,
                "cached_tokens": done.stats.cached_tokens,
                "oracle_tokens": best,
                "ttft_s": ttft,
                "retrieval_ms": prepared.retrieval_ms,
                "order_ms": prepared.order_ms,
                "chunk_ids": [c.chunk_id for c in prepared.chunks],
                "wall_s": time.perf_counter() - t0,
            }
        )
        if beside is not None:
            beside(len(rows) - 1, q)
    total = time.perf_counter() - start_all
    ttfts = [r["ttft_s"] for r in rows]
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    summary = {
        "token_hit_rate": round(cached / prompt, 4),
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "ttft_mean_s": round(statistics.mean(ttfts), 4),
        "ttft_p50_s": round(pct(ttfts, 0.5), 4),
        "ttft_p90_s": round(pct(ttfts, 0.9), 4),
        "total_s": round(total, 2),
        "order_ms_p50": round(pct([r["order_ms"] for r in rows], 0.5), 3),
        "order_ms_max": round(max(r["order_ms"] for r in rows), 3),
    }
    print(order, summary, flush=True)
    return {"summary": summary, "rows": rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxLmServer:
    """mlx_lm.server on 127.0.0.1 (its default prompt cache on), measured by streamed TTFT.

    Started through `import ragcache` so it gets the same OpenBLAS as we do: a fair fight.
    """

    def __init__(self, model_path: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*mlx_lm_server_command(model_path, self.port), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("mlx_lm.server did not start")

    def ttft(self, text: str) -> float:
        body = json.dumps({"prompt": text, "max_tokens": 1, "stream": True, "temperature": 0})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        first = None
        for line in conn.getresponse():
            if line.startswith(b"data:") and first is None:
                first = time.perf_counter() - t0
        conn.close()
        return first if first is not None else time.perf_counter() - t0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measured_rates(loaded) -> tuple[float, float]:
    """(prefill tok/s on a cold 1k prompt, seconds per decode step) on this machine, now."""
    engine = Engine(loaded)
    ids = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 200)[:1024]
    engine.generate(SegmentedPrompt(ids[:64], [64]), SamplingParams(max_tokens=2))
    done = engine.generate(SegmentedPrompt(ids, [len(ids)]), SamplingParams(max_tokens=17))
    step = done.stats.decode_s / max(1, done.stats.generated_tokens - 1)
    return len(ids) / done.stats.ttft_s, step


def _normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred), _normalize(gold)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def quality(loaded, answerer: Answerer, retriever, cases: list, questions: list, seed: int) -> dict:
    """Per case (question, chunk order as `cache` produced it): gold vs distractors by mean token
    log-likelihood, and a short greedy answer scored by exact match / F1, for both orders."""
    rng = random.Random(seed)
    answers = [q.answer for q in questions]
    tok = loaded.tokenizer
    model = loaded.model
    out = {o: {"ll_correct": 0, "em": 0, "f1": 0.0} for o in ("cache", "relevance")}
    for q, cache_ids in cases:
        hits = retriever.retrieve(q.question, 5).hits
        by_id = {h.chunk_id: answerer._source_chunk(h) for h in hits}
        distractors = rng.sample([a for a in answers if a != q.answer], 3)
        candidates = [q.answer, *distractors]
        orders = {"cache": cache_ids, "relevance": [h.chunk_id for h in hits]}
        for name, ids in orders.items():
            chunks = [by_id[c] for c in ids if c in by_id]
            prompt = answerer.builder.build(chunks, q.question).tokens
            cache = make_prompt_cache(model)
            logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
            mx.eval(logits)
            n = len(prompt)
            scores = []
            for cand in candidates:
                ids_c = tok.encode(" " + cand, add_special_tokens=False)[:48]
                x = mx.array(ids_c[:-1])[None]
                out_logits = model(x, cache=cache) if len(ids_c) > 1 else None
                all_logits = (
                    logits
                    if out_logits is None
                    else mx.concatenate([logits[:, None, :], out_logits], axis=1)[0]
                )
                lp = all_logits - mx.logsumexp(all_logits, axis=-1, keepdims=True)
                picked = mx.take_along_axis(
                    lp.reshape(-1, lp.shape[-1]), mx.array(ids_c)[:, None], axis=-1
                )
                scores.append(picked.mean().item())
                for c in cache:
                    c.trim(c.offset - n)
            out[name]["ll_correct"] += int(max(range(len(scores)), key=scores.__getitem__) == 0)
            # Short greedy answer from the same prompt cache.
            y = mx.argmax(logits, axis=-1)
            gen = []
            for _ in range(24):
                t = int(y.item())
                if t in loaded.eos_token_ids:
                    break
                gen.append(t)
                y = mx.argmax(model(mx.array([[t]]), cache=cache)[:, -1, :], axis=-1)
            text = tok.decode(gen)
            out[name]["em"] += int(" ".join(_normalize(q.answer)) in " ".join(_normalize(text)))
            out[name]["f1"] += f1(text, q.answer)
    n = max(1, len(cases))
    result = {
        name: {
            "ll_accuracy_points": round(100 * v["ll_correct"] / n, 2),
            "exact_match_points": round(100 * v["em"] / n, 2),
            "f1_points": round(100 * v["f1"] / n, 2),
        }
        for name, v in out.items()
    }
    result["cases"] = len(cases)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(ORDERS)
    s = [result["orders"][o] for o in names]
    axes[0].bar(names, [x["token_hit_rate"] for x in s], color="tab:blue")
    axes[0].axhline(result["reuse_upper_bound"], color="k", ls="--", label="upper bound")
    axes[0].set_title("token hit rate by chunk order")
    axes[0].legend()
    x = range(len(names))
    for off, key in ((-0.25, "ttft_mean_s"), (0, "ttft_p50_s"), (0.25, "ttft_p90_s")):
        axes[1].bar([i + off for i in x], [v[key] for v in s], 0.25, label=key)
    axes[1].bar(
        len(names),
        result["mlx_lm_server"]["ttft_mean_s"],
        0.25,
        color="tab:red",
        label="mlx_lm.server mean",
    )
    axes[1].set_xticks([*x, len(names)], [*names, "mlx_lm.server"])
    axes[1].set_title("time to first token (s)")
    axes[1].legend(fontsize=8)
    q = result["quality"]
    keys = ["ll_accuracy_points", "exact_match_points", "f1_points"]
    for off, name in ((-0.2, "cache"), (0.2, "relevance")):
        axes[2].bar([i + off for i in range(3)], [q[name][k] for k in keys], 0.4, label=name)
    axes[2].set_xticks(range(3), ["LL accuracy", "exact match", "F1"])
    axes[2].set_title(f"answer quality ({q['cases']} questions)")
    axes[2].legend()
    fig.suptitle(f"RAG workload: {result['settings']['requests']} requests, {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--exponent", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quality-questions", type=int, default=30)
    parser.add_argument("--server-requests", type=int, default=None, help="default: all")
    args = parser.parse_args()

    settings = load_settings()
    WORK.mkdir(parents=True, exist_ok=True)
    db = build_store(settings.home, args.model)
    dataset = load_dataset()
    stream = zipf_stream(list(dataset.questions), args.requests, args.exponent, args.seed)
    loaded = load_model(args.model, settings.home)
    retriever = Retriever(open_store(db), SentenceTransformerEmbedder())
    retriever.retrieve("warm up the embedder", 5)

    result: dict = {
        "machine": machine(),
        "model": args.model,
        "settings": {
            **vars(args),
            "k": 5,
            "paraphrases": 0,
            "note": "the labelled set has no paraphrases, so the stream has none",
        },
        "distinct_questions": len({q.id for q in stream}),
        "orders": {},
    }
    # mlx_lm.server gets the prompts a naive app sends: relevance order, as text; its requests
    # interleave with the `cache` run's so both see the same machine load.
    naive = Answerer(Engine(loaded), retriever, AnswerSettings(order="relevance"))
    n_server = args.server_requests or len(stream)
    server_ttfts: list[float] = []
    server = MlxLmServer(loaded.path)

    def beside(i: int, q: LabelledQuestion) -> None:
        if i < n_server:
            prepared = naive.prepare(q.question, 5, "relevance")
            text = loaded.tokenizer.decode(prepared.prompt.tokens)
            server_ttfts.append(prepared.retrieval_ms / 1000 + server.ttft(text))

    runs = {}
    try:
        for order in ORDERS:
            runs[order] = run_order(
                loaded,
                retriever,
                order,
                stream,
                oracle=(order == "cache"),
                beside=beside if order == "cache" else None,
            )
            result["orders"][order] = runs[order]["summary"]
    finally:
        server.close()
    rows = runs["cache"]["rows"]
    reused = sum(r["cached_tokens"] for r in rows)
    oracle = sum(r["oracle_tokens"] for r in rows)
    total_prompt = sum(r["prompt_tokens"] for r in rows)
    result["reuse_upper_bound"] = round(oracle / total_prompt, 4)
    result["order_reuse_vs_oracle"] = round(reused / oracle, 4) if oracle else 1.0
    rel = result["orders"]["relevance"]["cached_tokens"]
    result["order_reuse_vs_relevance"] = round(reused / rel, 4) if rel else math.inf

    prefill_tps, step_s = measured_rates(loaded)
    floors = [
        r["retrieval_ms"] / 1000 + (r["prompt_tokens"] - r["oracle_tokens"]) / prefill_tps + step_s
        for r in rows
    ]
    result["floor"] = {
        "prefill_tps": round(prefill_tps, 1),
        "decode_step_s": round(step_s, 4),
        "mean_floor_s": round(statistics.mean(floors), 4),
    }
    result["ttft_vs_floor"] = round(
        result["orders"]["cache"]["ttft_mean_s"] / statistics.mean(floors), 4
    )

    server = server_ttfts
    answerer = naive
    ours = [r["ttft_s"] for r in rows[:n_server]]
    result["mlx_lm_server"] = {
        "requests": n_server,
        "ttft_mean_s": round(statistics.mean(server), 4),
        "ttft_p50_s": round(pct(server, 0.5), 4),
        "ours_ttft_mean_s": round(statistics.mean(ours), 4),
    }
    result["ttft_ratio_vs_mlx_lm_server"] = round(
        statistics.mean(ours) / statistics.mean(server), 4
    )
    print("mlx_lm.server", result["mlx_lm_server"], flush=True)

    # Quality: the distinct questions of the stream, with the order `cache` gave them there.
    seen, cases = set(), []
    by_id = {q.id: q for q in dataset.questions}
    for r in rows:
        if r["id"] not in seen and len(cases) < args.quality_questions:
            seen.add(r["id"])
            cases.append((by_id[r["id"]], r["chunk_ids"]))
    q = quality(loaded, answerer, retriever, cases, list(dataset.questions), args.seed)
    result["quality"] = q
    result["quality_delta_points"] = round(
        q["cache"]["ll_accuracy_points"] - q["relevance"]["ll_accuracy_points"], 2
    )
    result["goals"] = {
        "order_reuse_vs_oracle>=0.98": result["order_reuse_vs_oracle"] >= 0.98,
        "order_reuse_vs_relevance>=2.0": result["order_reuse_vs_relevance"] >= 2.0,
        "ttft_ratio_vs_mlx_lm_server<=0.2": result["ttft_ratio_vs_mlx_lm_server"] <= 0.2,
        "ttft_vs_floor<=1.2": result["ttft_vs_floor"] <= 1.2,
        "quality_delta_points>=-0.5": result["quality_delta_points"] >= -0.5,
        "order_ms_under_1": result["orders"]["cache"]["order_ms_p50"] < 1.0,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("orders",)}, indent=1)[:3000])
    write_results("rag_workload", result)
    plot(result, Path(__file__).resolve().parent / "results" / "rag_workload.png")


if __name__ == "__main__":
    main()
