"""Chunk reuse (ragcache.cache.chunk_kv) against the exact prefix path, in one run.

Three request streams (fixed seed), each answered in each mode over a fresh cache, k=4 chunks in
`cache` order (the default), answers of up to `--max-tokens` generated greedily:

- `faq` (the headline): a FAQ desk. The Python FAQ's 171 labelled questions drawn by Zipf
  popularity (exponent 1.0: popular questions come back), a third asked in other words ("Tell
  me: ..."), retrieval over the FAQ's pages. A question retrieves the entries that answer it and
  their neighbours in meaning, so later questions bring chunks computed before, in new
  combinations and at new positions: what prefix reuse cannot share.
- `docs_qa`: people asking about one document at a time ("ask this page"): the 84 hand-written
  questions of `datasets/python_docs_topic_questions.jsonl` about 11 pages of the Python tutorial
  and HOWTOs, pages drawn by Zipf popularity, questions uniformly within a page, a third
  paraphrased, retrieval restricted to the page (`where doc_id = ...`).
- `git_help`: the git manual's labelled questions over the whole store, Zipf over the pages that
  answer them (exponent 1.2), half paraphrased (the two reference pages, one chunk per variable,
  left out). Different questions share few chunks here.

Modes: `off` (exact prefix reuse only: the default and the baseline) and `epic/<r>` (chunks
computed before in any prompt have their K/V copied, their marker and first r tokens
recomputed; a prompt assembled before is restored whole): r swept on `faq`, the default r on
the others. Each mode has a cache of its own; the modes take turns request by request, so the
machine's drift falls on all alike. Per stream and mode:
- `reused_token_share`: prompt tokens not computed (exact prefix + copied) over all prompt tokens,
  and the share each source gave;
- `prefix_bound`: what any prefix cache could reuse (the best order of each request's chunks
  against the tree as it was, the rag_workload oracle); `chunk_bound`: what a chunk cache could
  reuse at most (the prefix bound, or the system prompt plus every chunk body seen earlier in
  the stream, whichever is larger);
- mean and p50 time to first token (retrieval included) and `ttft_vs_prefix_only`;
- `score` of the generated answers (short gold answers: contained; FAQ answers: token F1 against
  the gold passage's first sentences), `quality_delta_points` against `off` with its 95%
  interval (`quality_delta_ci95`, a paired bootstrap over the requests), and `same_answer_rate`
  (answers token for token the same as `off`'s).

Quality on the answers benchmark (`quality`): report-half questions of both labelled sets, the
worst case for chunk reuse: each answered exactly on a cold cache, then with every chunk copied
after it was computed in another prompt (the same chunks reversed, after another question: at
another position, behind other neighbours), per r. Scores: accuracy for short answers, token F1
for long ones (raw model text, so nothing but the K/V differs), the delta in points with its 95%
interval, `same_answer_rate`, and two measures of how close the assembled K/V is, over the exact answer's
positions (teacher-forced): the share of positions whose greedy token is the exact run's
(`token_agreement`) and the mean KL divergence of the next-token distributions (`kl_nats`).

The peer, `llama_server` in each stream: llama.cpp's llama-server (benchmarks/llama_server.py:
`benchmarks/build_llama_server.sh` builds it for this CPU; the prebuilt one on PyPI needs Intel
AMX) on the GGUF the model was converted from, 2 threads, one slot, its prompt cache on and its
partial reuse by KV shifting (`--cache-reuse 64`), a fresh process per stream, given each
request's prompt tokens after ragcache's modes. Its time to first token is the request's
retrieval plus its own prompt processing as it reports it; `ttft_vs_llama_server` is the default
chunk-reuse mode's mean over llama-server's on the `faq` stream (goal <= 0.5), null when no
llama-server runs here (`llama_server.binary` says why).

    .venv/bin/python benchmarks/chunk_reuse.py [--requests 100] [--quality 80] [--recompute 0,8,32]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (optimized BLAS under MLX before mlx loads)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from benchmarks.llama_server import (  # noqa: E402
    LlamaServer,
    LlamaServerBinary,
    LlamaServerUnavailable,
    find_binary,
)
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
from ragcache.cache.chunk_kv import ASSEMBLED_MARK  # noqa: E402
from ragcache.datasets import load_topic_questions  # noqa: E402
from ragcache.embedded_models import EMBEDDED_MODELS  # noqa: E402
from ragcache.embedder import SentenceTransformerEmbedder  # noqa: E402
from ragcache.engine import Engine  # noqa: E402
from ragcache.model_loader import load_model  # noqa: E402
from ragcache.retrieve import Retriever  # noqa: E402
from ragcache.sampling import SamplingParams  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.store import open_store  # noqa: E402

K = 4  # chunks per prompt, as in the measurement
# llama-server reuses a run of at least this many cached tokens found later in a new prompt
# (shifting its KV into place): below the ~100-token chunks here, so any chunk qualifies.
LLAMA_CACHE_REUSE = 64
REFERENCE_PAGES = ("git_docs/git-config.md", "git_docs/gitweb.conf.md")
PARAPHRASES = (  # {s}: the corpus's subject ("Python", "git")
    "Tell me: {q}",
    "In {s}, {l}",
    "Quick question. {q}",
    "{q} Please answer briefly.",
)


def paraphrase(question: str, rng: random.Random, subject: str) -> str:
    template = rng.choice(PARAPHRASES)
    return template.format(q=question, l=question[:1].lower() + question[1:], s=subject)


def zipf_choice(items: list, rng: random.Random, exponent: float) -> Any:
    weights = [1.0 / (i + 1) ** exponent for i in range(len(items))]
    return rng.choices(items, weights=weights, k=1)[0]


FAQ_PAGES = "doc_id LIKE 'python_docs/faq/%'"


def faq_stream(questions: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` requests to a FAQ desk: Zipf over the FAQ's questions (popular ones come back), a
    third paraphrased, retrieval over the FAQ's pages. Deterministic for a seed."""
    rng = random.Random(seed)
    ranked = [q for q in questions if q.get("gold_doc_id")]
    rng.shuffle(ranked)  # popularity independent of file order
    stream = []
    for _ in range(n):
        q = dict(zipf_choice(ranked, rng, 1.0))
        if rng.random() < 1 / 3:
            q["question"] = paraphrase(q["question"], rng, "Python")
            q["paraphrased"] = True
        stream.append({**q, "where": FAQ_PAGES, "topic": q["gold_doc_id"]})
    return stream


def docs_qa_stream(n: int, seed: int = 0) -> list[dict]:
    """`n` requests about single pages: Zipf over pages, uniform over each page's questions, a
    third paraphrased, retrieval restricted to the page. Deterministic for a seed."""
    rng = random.Random(seed)
    topics: dict[str, list[dict]] = defaultdict(list)
    for q in load_topic_questions():
        topics[q.gold_doc_id].append(
            {"id": q.id, "question": q.question, "golds": [q.answer, *q.aliases], "kind": "short"}
        )
    pages = sorted(topics)
    rng.shuffle(pages)  # popularity independent of file order
    stream = []
    for _ in range(n):
        page = zipf_choice(pages, rng, 1.0)
        q = dict(rng.choice(topics[page]))
        if rng.random() < 1 / 3:
            q["question"] = paraphrase(q["question"], rng, "Python")
            q["paraphrased"] = True
        stream.append({**q, "where": f"doc_id = '{page}'", "topic": page})
    return stream


def git_help_stream(questions: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` git-manual requests over the whole store: Zipf over the pages that answer them
    (exponent 1.2), uniform within a page, half paraphrased. Deterministic for a seed."""
    rng = random.Random(seed)
    topics: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        if q.get("gold_doc_id") and q["gold_doc_id"] not in REFERENCE_PAGES:
            topics[q["gold_doc_id"]].append(q)
    # A topic is a page people ask several things about; the reference pages (one chunk per
    # configuration variable) are none: questions about different variables share no chunk.
    ranked = sorted(
        (t for t, qs in topics.items() if len(qs) >= 2), key=lambda t: (-len(topics[t]), t)
    )
    rng.shuffle(ranked)  # popularity independent of size
    weights = [1.0 / (i + 1) ** 1.2 for i in range(len(ranked))]
    stream = []
    for topic in rng.choices(ranked, weights=weights, k=n):
        q = dict(rng.choice(topics[topic]))
        if rng.random() < 0.5:
            q["question"] = paraphrase(q["question"], rng, "git")
            q["paraphrased"] = True
        stream.append({**q, "where": None, "topic": topic})
    return stream


def cache_for(loaded, recompute: int) -> PrefixCache:
    return PrefixCache(
        loaded, CacheSettings(cache_bytes=8 << 30, disk_dir=None, chunk_recompute_tokens=recompute)
    )


def chunk_bound(prepared, seen: set[str], oracle: int) -> int:
    """Tokens a chunk cache could skip at most: the prefix oracle's, or the system prompt plus
    the bodies of chunks computed earlier in the stream (wherever they stood)."""
    prompt = prepared.prompt
    system = prompt.boundaries[0]
    bodies = sum(
        b - a
        for chunk, (a, b) in zip(prepared.chunks, prompt.chunk_spans, strict=True)
        if chunk.chunk_id in seen
    )
    return max(oracle, system + bodies)


def run_stream(
    loaded,
    retriever: Retriever,
    stream: list[dict],
    modes: list[tuple[str, int]],
    max_tokens: int,
    peer: LlamaServer | None = None,
) -> dict[str, dict]:
    """Every mode over the stream, each with a fresh cache of its own, interleaved request by
    request (so a slow minute of the machine falls on every mode alike). `modes`: (chunk reuse
    mode, recompute tokens); the first is the baseline. Retrieval and ordering are the same for
    all: the prompt is made once, with the baseline's cache (the `cache` order looks at it).
    `peer`: a llama-server (a fresh process for this stream) given the same prompt tokens after
    ragcache's modes, with its own prompt cache; its time to first token is the retrieval's plus
    its own prompt processing (`timings.prompt_ms`, measured by the server: no HTTP in it)."""
    caches = [cache_for(loaded, r) for _, r in modes]
    engines = [Engine(loaded, cache=c) for c in caches]
    answerer = Answerer(engines[0], retriever, AnswerSettings())
    params = [
        SamplingParams(max_tokens=max_tokens, chunk_reuse=mode, speculation="off")
        for mode, _ in modes
    ]
    rows: list[list[dict]] = [[] for _ in modes]
    peer_rows: list[dict] = []
    seen: set[str] = set()
    for q in stream:
        prepared = answerer.prepare(q["question"], K, where=q["where"], mode="generate")
        oracle = oracle_reuse(answerer, prepared, caches[0].tree)
        bounds = (oracle, chunk_bound(prepared, seen, oracle))
        seen.update(c.chunk_id for c in prepared.chunks)
        for engine, p, out in zip(engines, params, rows, strict=True):
            done = engine.generate(prepared.prompt, p)
            s = done.stats
            out.append(
                {
                    "prompt": s.prompt_tokens,
                    "prefix": s.cached_tokens,
                    "copied": s.chunk_reused_tokens,
                    "bounds": bounds,
                    "ttft_s": prepared.retrieval_ms / 1000 + s.ttft_s,
                    "score": score(q, done.text),
                    "tokens": list(done.tokens),
                }
            )
        if peer is not None:
            timings = peer.complete(prepared.prompt.tokens, 1, cache_prompt=True)["timings"]
            peer_rows.append(
                {
                    "prompt": len(prepared.prompt),
                    "cached": timings.get("cache_n", 0),
                    "ttft_s": prepared.retrieval_ms / 1000 + timings["prompt_ms"] / 1000,
                }
            )
    for engine in engines:
        engine.close()
    summaries: dict[str, dict] = {}
    base = rows[0]
    for (mode, r), cache, got in zip(modes, caches, rows, strict=True):
        prompt = sum(x["prompt"] for x in got)
        prefix = sum(x["prefix"] for x in got)
        copied = sum(x["copied"] for x in got)
        ttfts = [x["ttft_s"] for x in got]
        m = {
            "reused_token_share": round((prefix + copied) / prompt, 4),
            "prefix_share": round(prefix / prompt, 4),
            "copied_share": round(copied / prompt, 4),
            "ttft_mean_s": round(statistics.mean(ttfts), 4),
            "ttft_p50_s": round(pct(ttfts, 0.5), 4),
            "score": round(statistics.mean(x["score"] for x in got), 4),
            "prompt_tokens": prompt,
            "chunk_entries": cache.stats().chunk_entries,
            "cache_ram_mb": round(cache.stats().ram_bytes / 2**20, 1),
        }
        if got is base:
            m["prefix_bound"] = round(sum(x["bounds"][0] for x in got) / prompt, 4)
            m["chunk_bound"] = round(sum(x["bounds"][1] for x in got) / prompt, 4)
        else:
            m["ttft_vs_prefix_only"] = round(
                m["ttft_mean_s"] / statistics.mean(x["ttft_s"] for x in base), 4
            )
            m["quality_delta_points"] = round(
                100
                * statistics.mean(x["score"] - y["score"] for x, y in zip(got, base, strict=True)),
                2,
            )
            m["quality_delta_ci95"] = delta_interval(
                [y["score"] for y in base], [x["score"] for x in got]
            )
            same = sum(x["tokens"] == y["tokens"] for x, y in zip(got, base, strict=True))
            m["same_answer_rate"] = round(same / len(stream), 4)
        name = "off" if mode == "off" else f"{mode}/{r}"
        summaries[name] = m
        print(name, m, flush=True)
    if peer_rows:
        ttfts = [x["ttft_s"] for x in peer_rows]
        summaries["llama_server"] = {
            "reused_token_share": round(
                sum(x["cached"] for x in peer_rows) / sum(x["prompt"] for x in peer_rows), 4
            ),
            "ttft_mean_s": round(statistics.mean(ttfts), 4),
            "ttft_p50_s": round(pct(ttfts, 0.5), 4),
        }
        print("llama_server", summaries["llama_server"], flush=True)
    return summaries


def run_streams(
    loaded,
    retrievers: dict,
    streams: dict,
    sweeps: dict[str, list[int]],
    max_tokens: int,
    peer: Callable[[str], contextlib.AbstractContextManager[LlamaServer | None]],
) -> dict:
    out = {}
    for name, (store, stream) in streams.items():
        modes = [("off", 0)] + [("epic", r) for r in sweeps[name]]
        with peer(name) as server:
            measured = run_stream(loaded, retrievers[store], stream, modes, max_tokens, server)
        measured["off"]["ttft_vs_prefix_only"] = 1.0
        peer_summary = measured.pop("llama_server", None)
        out[name] = {
            "store": store,
            "requests": len(stream),
            "topics": len({q["topic"] for q in stream}),
            "distinct_questions": len({q["question"] for q in stream}),
            "paraphrased": sum(bool(q.get("paraphrased")) for q in stream),
            "modes": measured,
            "llama_server": peer_summary,
        }
    return out


# --- quality on the answers benchmark: the worst case ----------------------------------------


def delta_interval(exact: list[float], reused: list[float], draws: int = 2000) -> list[float]:
    """95% interval of the mean score difference (reused - exact), in points, by a paired
    bootstrap over questions: how far the delta could move by the luck of the sample."""
    rng = np.random.default_rng(0)
    diffs = np.asarray(reused, dtype=np.float64) - np.asarray(exact, dtype=np.float64)
    means = diffs[rng.integers(0, len(diffs), size=(draws, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(100 * float(low), 2), round(100 * float(high), 2)]


def score(row: dict, text: str) -> float:
    if row["kind"] == "short":
        return float(contains_answer(text, row["golds"]))
    return token_recall_f1(text, row["answer"])[1]


def forget_assembled(cache: PrefixCache) -> None:
    """Drop the assembled prompts the cache stored (their chunk entries stay)."""
    node = cache.tree.root.children.get(ASSEMBLED_MARK)
    if node is not None:
        cache.tree.drop(node)


def next_token_logprobs(engine: Engine, session, copies, tokens: list[int], answer: list[int]):
    """Log-probabilities of the next token at the prompt's last position and after each answer
    token but the last (teacher-forced), from `session`'s restored and assembled K/V."""
    steps = engine.prefill_steps(tokens, session.start, session.prompt_cache, session, copies)
    position = list(steps)[-1]  # the first position the steps left to compute
    rest = mx.array([*tokens[position:], *answer[:-1]])[None]
    logits = engine.loaded.model(rest, cache=session.prompt_cache)[0].astype(mx.float32)
    logits = logits[len(tokens) - 1 - position :]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def quality(loaded, retrievers: dict, rows: list[dict], sweep: list[int], max_tokens: int) -> dict:
    exact = SamplingParams(max_tokens=max_tokens, speculation="off")
    reuse = SamplingParams(max_tokens=max_tokens, chunk_reuse="epic", speculation="off")
    warm = SamplingParams(max_tokens=1, chunk_reuse="epic", speculation="off")
    runs = {
        r: {"scores": [], "same": 0, "copied": 0, "prompt": 0, "agree": [], "kl": []} for r in sweep
    }
    exact_scores = []
    for i, row in enumerate(rows):
        # Exact: a cold cache of its own; the prompt it stores gives the reference logits.
        cold_cache = cache_for(loaded, 0)
        cold = Engine(loaded, cache=cold_cache)
        answerer = Answerer(cold, retrievers[row["store"]], AnswerSettings())
        prepared = answerer.prepare(row["question"], K, mode="generate")
        tokens = list(prepared.prompt.tokens)
        done = cold.generate(prepared.prompt, exact)
        exact_scores.append(score(row, done.text))
        answer = list(done.tokens)
        session = cold_cache.begin(tokens, prepared.prompt.boundaries)
        reference = next_token_logprobs(cold, session, [], tokens, answer)
        session.abort()
        cold.close()
        # Reuse: each chunk computed first in another prompt (the same chunks reversed, after
        # another question); a chunk entry does not depend on how much of it a later prompt
        # recomputes, so one cache serves the whole sweep.
        cache = cache_for(loaded, sweep[0])
        engine = Engine(loaded, cache=cache)
        other = answerer.builder.build(list(reversed(prepared.chunks)), "What else is there?")
        engine.generate(other, warm)
        for r in sweep:
            cache.settings = replace(cache.settings, chunk_recompute_tokens=r)
            forget_assembled(cache)  # each setting assembles the prompt afresh
            done = engine.generate(prepared.prompt, reuse)
            run = runs[r]
            run["scores"].append(score(row, done.text))
            run["same"] += list(done.tokens) == answer
            run["copied"] += done.stats.chunk_reused_tokens
            run["prompt"] += done.stats.prompt_tokens
            session = cache.begin(tokens, prepared.prompt.boundaries)
            copies = cache.assemble(session, prepared.prompt.chunk_spans)
            got = next_token_logprobs(engine, session, copies, tokens, answer)
            session.abort()
            run["agree"].append(float(np.mean(got.argmax(-1) == reference.argmax(-1))))
            kl = np.sum(np.exp(reference) * (reference - got), axis=-1)
            run["kl"].append(float(np.mean(kl)))
        engine.close()
        if (i + 1) % 10 == 0:
            print(f"  quality {i + 1}/{len(rows)}", flush=True)
    by_r = {}
    for r, run in runs.items():
        by_r[str(r)] = {
            "quality_delta_points": round(
                100 * (statistics.mean(run["scores"]) - statistics.mean(exact_scores)), 2
            ),
            "score_points": round(100 * statistics.mean(run["scores"]), 2),
            "quality_delta_ci95": delta_interval(exact_scores, run["scores"]),
            "same_answer_rate": round(run["same"] / len(rows), 4),
            "token_agreement": round(statistics.mean(run["agree"]), 4),
            "kl_nats": round(statistics.mean(run["kl"]), 4),
            "copied_share": round(run["copied"] / run["prompt"], 4),
        }
        print("quality", r, by_r[str(r)], flush=True)
    return {
        "questions": len(rows),
        "short": sum(r["kind"] == "short" for r in rows),
        "long": sum(r["kind"] == "long" for r in rows),
        "exact_score_points": round(100 * statistics.mean(exact_scores), 2),
        "by_recompute": by_r,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = result["streams"]
    fig, axes = plt.subplots(1, len(streams) + 2, figsize=(6 * (len(streams) + 2) - 4, 4.8))
    for ax, (name, s) in zip(axes, streams.items(), strict=False):
        modes = s["modes"]
        names = list(modes)
        ax.bar(names, [modes[m]["prefix_share"] for m in names], label="exact prefix")
        ax.bar(
            names,
            [modes[m]["copied_share"] for m in names],
            bottom=[modes[m]["prefix_share"] for m in names],
            label="copied chunk K/V",
        )
        ax.axhline(modes["off"]["prefix_bound"], color="k", ls="--", label="prefix bound")
        ax.axhline(modes["off"]["chunk_bound"], color="tab:purple", ls="-.", label="chunk bound")
        ax.axhline(0.8, color="tab:red", ls=":", label="goal 0.8")
        ttfts = [modes[m]["ttft_mean_s"] for m in names]
        if s.get("llama_server"):
            names.append("llama-server")
            ax.bar(names[-1:], [s["llama_server"]["reused_token_share"]], color="tab:gray")
            ttfts.append(s["llama_server"]["ttft_mean_s"])
        for i, ttft in enumerate(ttfts):
            ax.text(i, 0.02, f"{ttft:.2f}s", ha="center", color="white")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: prompt tokens not computed (TTFT in bars)")
        ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(axis="x", rotation=30)
    q = result["quality"]["by_recompute"]
    rs = [int(r) for r in q]
    ax = axes[-2]
    ax.plot(
        rs, [q[str(r)]["quality_delta_points"] for r in rs], "o-", label="benchmark (worst case)"
    )
    for name, s in streams.items():
        points = [(r, s["modes"][f"epic/{r}"]) for r in rs if f"epic/{r}" in s["modes"]]
        ax.plot(
            [r for r, _ in points],
            [m["quality_delta_points"] for _, m in points],
            "s--",
            label=f"{name} stream",
        )
    ax.axhline(-1.0, color="tab:red", ls=":", label="goal -1")
    ax.set_xlabel("tokens recomputed per copied chunk")
    ax.set_title("quality delta vs exact, points")
    ax.legend(fontsize=8)
    ax = axes[-1]
    ax.plot(rs, [q[str(r)]["token_agreement"] for r in rs], "o-", label="token agreement")
    ax.plot(rs, [q[str(r)]["copied_share"] for r in rs], "s--", label="copied share")
    ax.set_xlabel("tokens recomputed per copied chunk")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"worst case, {result['quality']['questions']} questions")
    ax.legend(fontsize=8)
    fig.suptitle(f"chunk reuse, {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100, help="requests of the faq stream")
    ap.add_argument("--other-requests", type=int, default=60, help="of the other two streams")
    ap.add_argument("--quality", type=int, default=80, help="report-half questions scored")
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
    n, other = args.requests, args.other_requests
    streams = {
        "faq": ("python_docs", faq_stream(questions["python_docs"], n, args.seed)),
        "docs_qa": ("python_docs", docs_qa_stream(other, args.seed)),
        "git_help": ("git_docs", git_help_stream(questions["git_docs"], other, args.seed)),
    }
    default_r = CacheSettings().chunk_recompute_tokens
    sweeps = {"faq": sweep, "docs_qa": [default_r], "git_help": [default_r]}

    peer_gguf = EMBEDDED_MODELS[args.model].locate(settings.home / "sources")
    binary: LlamaServerBinary | None = None
    try:
        binary = find_binary(settings.home)
        peer_why = f"{binary.origin}, {binary.version()}"
    except LlamaServerUnavailable as exc:
        peer_why = str(exc)

    @contextlib.contextmanager
    def peer(stream: str) -> Iterator[LlamaServer | None]:
        """A fresh llama-server for each stream (an empty cache, as ragcache's modes start)."""
        if binary is None:
            yield None
            return
        log = RESULTS.parent / ".work" / f"llama-server-chunk-reuse-{stream}.log"
        server = LlamaServer(binary, peer_gguf, log, threads=2, cache_reuse=LLAMA_CACHE_REUSE)
        with server:
            yield server

    started = time.perf_counter()
    measured = run_streams(loaded, retrievers, streams, sweeps, args.max_tokens, peer)
    report = [
        {**q, "store": store}
        for store in ("git_docs", "python_docs")
        for q in questions[store]
        if half(q["id"]) == "report" and q["kind"] != "unanswerable"
    ]
    random.Random(args.seed).shuffle(report)
    result: dict[str, Any] = {
        "machine": machine(),
        "model": args.model,
        "chunk_reuse_unsupported": cache_for(loaded, 0).chunk_unsupported,
        "settings": {**vars(args), "k": K, "order": "cache"},
        "streams": measured,
        "quality": quality(loaded, retrievers, report[: args.quality], sweep, args.max_tokens),
        "llama_server": {
            "binary": peer_why,
            "gguf": peer_gguf.name,
            "flags": f"-t 2 -tb 2 -np 1 --cache-reuse {LLAMA_CACHE_REUSE}, cache_prompt on",
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    # The headline: the stream chunk reuse is for, at the recompute setting the cache uses by
    # default, and the worst-case quality on the answers benchmark.
    key = f"epic/{default_r}"
    headline = measured["faq"]["modes"]
    if key in headline and str(default_r) in result["quality"]["by_recompute"]:
        result["default_recompute_tokens"] = default_r
        result["reused_token_share"] = headline[key]["reused_token_share"]
        result["ttft_vs_prefix_only"] = headline[key]["ttft_vs_prefix_only"]
        at_default = result["quality"]["by_recompute"][str(default_r)]
        result["quality_delta_points"] = at_default["quality_delta_points"]
        result["quality_delta_ci95"] = at_default["quality_delta_ci95"]
        result["prefix_bound"] = headline["off"]["prefix_bound"]
        result["chunk_bound"] = headline["off"]["chunk_bound"]
        peer_faq = measured["faq"]["llama_server"]
        if peer_faq:
            result["ttft_vs_llama_server"] = round(
                headline[key]["ttft_mean_s"] / peer_faq["ttft_mean_s"], 4
            )
    path = write_results("chunk_reuse", result)
    plot(result, path.with_suffix(".png"))
    keys = ("reused_token_share", "ttft_vs_prefix_only", "quality_delta_points", "prefix_bound")
    print({k: result.get(k) for k in keys})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
