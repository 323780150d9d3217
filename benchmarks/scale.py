"""Routing across model replicas, simulated: the real router, replicas simulated by the real cache
tree, no model.

A long RAG stream (fixed seed): topics drawn by Zipf popularity (exponent 1.0), each request
retrieving k=4 of its topic's 8 chunks (overlapping sets in different combinations) in canonical
order after one shared system prompt, a fresh question each time, one in five a follow-up turn
of an earlier conversation. Each replica is a `RadixTree` over token ids with its own budget
(the KV it can hold, in tokens); a request's hit is the prefix its replica's tree matched, after
which the prompt is inserted, as the prefix cache does. Requests in flight are modelled by a
window: the load of a replica is how many of the last `concurrency` requests went there.

Per replica count (1..64) and routing policy: token hit rate (tokens matched / prompt tokens)
and load imbalance (busiest replica's requests / the mean). Policies: `affinity`
(ragcache.affinity.AffinityRouter, keyed by chunk ids), `power-of-two` (Ray Serve's default: the
less loaded of two random replicas) and `random`.

`simulated_replica_hit_ratio`: 2 replicas with affinity over 1 replica (same total stream);
`simulated_affinity_vs_random_hit`: 2 replicas, affinity over power-of-two.

Then real Ray Serve replicas (benchmarks/scale_replicas.py: `ragcache serve --replicas`'s code,
SmolLM2, the Python FAQ, a Zipf stream through the HTTP front): `replica_hit_ratio` (2 replicas
with affinity over 1) and `affinity_vs_random_hit` (affinity over Ray Serve's power-of-two).

Then the store side (benchmarks/scale_ingest.py): `ray_ingest_vs_local` and `ray_table_equal`
(the Ray Data engine against the local pipeline on the same corpus), `s3_ingest_ok` and
`s3_search_p50_ms` (a store on moto's S3 server on 127.0.0.1).

    .venv/bin/python benchmarks/scale.py [--requests 6000] [--no-store] [--no-replicas]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from ragcache.affinity import AffinityRouter, AffinitySettings, Segment, key_id  # noqa: E402
from ragcache.cache.tree import RadixTree  # noqa: E402

POLICIES = ("affinity", "power-of-two", "random")
REPLICAS = (1, 2, 4, 8, 16, 32, 64)


class _Count:
    """Payload ops for a simulated replica's tree: the payload is its span's token count."""

    def n_bytes(self, payload: Any) -> int:
        return int(payload) if payload else 0

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        return at, int(payload) - at


def make_stream(n: int, topics: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(topics)]
    chunk_tokens = {f"t{t}c{c}": rng.randrange(120, 260) for t in range(topics) for c in range(8)}
    conversations: list[dict] = []
    stream = []
    for i in range(n):
        if conversations and rng.random() < 0.2:
            conv = rng.choice(conversations)
            conv["turns"] += 1
            chunks = rng.sample([f"t{conv['topic']}c{c}" for c in range(8)], 2)
            stream.append({"conversation": conv["id"], "prefix": list(conv["prefix"]),
                           "chunks": sorted(chunks), "question": f"q{i}"})  # fmt: skip
            conv["prefix"] += [*sorted(chunks), f"q{i}"]
            continue
        topic = rng.choices(range(topics), weights=weights)[0]
        chunks = sorted(rng.sample([f"t{topic}c{c}" for c in range(8)], 4))
        cid = f"c{i}"
        conversations.append({"id": cid, "topic": topic, "prefix": [*chunks, f"q{i}"], "turns": 1})
        stream.append({"conversation": cid, "prefix": [], "chunks": chunks, "question": f"q{i}"})
    for r in stream:
        keys = ["system", *r["prefix"], *r["chunks"], r["question"]]
        r["segments"] = [
            Segment(k, 60 if k == "system" else chunk_tokens.get(k, 20), shared=k == "system")
            for k in keys
        ]
    return stream


def tokens_of(segments: list[Segment]) -> list[int]:
    """Token ids a segment stands for (stable per key), as the replica's cache would see them."""
    out: list[int] = []
    for s in segments:
        base = (key_id(s.key) % 2**40) * 1000
        out.extend(base + j for j in range(s.tokens))
    return out


def run(stream: list[dict], n: int, policy: str, budget: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    names = [f"r{i}" for i in range(n)]
    trees = {name: RadixTree(_Count(), budget, "lru") for name in names}
    router = AffinityRouter(names, AffinitySettings(tokens_per_replica=budget))
    window: deque[str] = deque(maxlen=concurrency)
    counts: Counter[str] = Counter()
    hit = total = 0
    for r in stream:
        load = Counter(window)
        if policy == "affinity":
            name = router.route(r["segments"], load, r["conversation"]).replica
        elif policy == "power-of-two":
            a, b = rng.sample(names, 2) if n > 1 else (names[0], names[0])
            name = a if load[a] <= load[b] else b
        else:
            name = rng.choice(names)
        window.append(name)
        counts[name] += 1
        tokens = tokens_of(r["segments"])
        tree = trees[name]
        hit += min(tree.match(tokens).prefix_len, len(tokens) - 1)
        total += len(tokens)
        tree.insert(tokens, lambda a, b: b - a)
        tree.touch(tree.match(tokens).path)
    mean = len(stream) / n
    return {
        "hit_rate": round(hit / total, 4),
        "imbalance": round(max(counts[x] for x in names) / mean, 4),
        "busiest_share": round(max(counts.values()) / len(stream), 4),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = result.get("live_replicas")
    fig, axes = plt.subplots(1, 3 if live else 2, figsize=(18 if live else 12, 4.5))
    sim = result["simulation"]
    xs = [int(n) for n in sim]
    for policy in POLICIES:
        axes[0].plot(xs, [sim[str(n)][policy]["hit_rate"] for n in xs], "o-", label=policy)
        axes[1].plot(xs, [sim[str(n)][policy]["imbalance"] for n in xs], "o-", label=policy)
    if live:
        names = [n for n in ("1-replica", "2-affinity", "2-power-of-two") if n in live]
        bounded = live.get("memory_bound", {})
        share = bounded.get("bounded_share") or 0.0
        regimes = (
            (-0.27, live, "questions, cache holds the stream"),
            (0.0, bounded, f"questions, {share:.2f} of the working set per replica, RAM only"),
            (0.27, live.get("conversations", {}), "chats: a third of turns are follow-ups"),
        )
        xs_bar = range(len(names))
        for offset, source, label in regimes:
            if not all(n in source for n in names):
                continue
            heights = [source[n]["hit_rate"] for n in names]
            axes[2].bar([x + offset for x in xs_bar], heights, width=0.27, label=label)
            for x, h in zip(xs_bar, heights, strict=True):
                axes[2].text(x + offset, h, f"{h:.3f}", ha="center", va="bottom", fontsize=8)
        axes[2].set_xticks(list(xs_bar), names)
        axes[2].legend(fontsize=8, loc="lower center")
        axes[2].set_title(
            f"real Ray Serve replicas: token hit rate ({live['settings']['requests']} requests)"
        )
    for ax, title in zip(
        axes[:2], ("token hit rate", "load imbalance (busiest / mean)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"routing simulation: {result['settings']['requests']} requests, "
        f"{result['settings']['budget_tokens']} KV tokens per replica"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--topics", type=int, default=400)
    ap.add_argument("--budget-tokens", type=int, default=60_000, help="KV per replica, tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--corpus",
        nargs="+",
        default=["datasets/python_docs/faq", "datasets/python_docs/tutorial"],
        help="what the store measurements ingest",
    )
    ap.add_argument("--no-store", action="store_true", help="skip the store measurements")
    ap.add_argument("--no-replicas", action="store_true", help="skip the live replicas")
    ap.add_argument("--live-requests", type=int, default=40, help="the live replicas' stream")
    args = ap.parse_args()
    started = time.perf_counter()
    stream = make_stream(args.requests, args.topics, args.seed)
    sim: dict[str, dict] = {}
    for n in REPLICAS:
        concurrency = 4 * n
        sim[str(n)] = {
            p: run(stream, n, p, args.budget_tokens, concurrency, args.seed) for p in POLICIES
        }
        print(n, sim[str(n)], flush=True)
    one = sim["1"]["affinity"]["hit_rate"]
    two = sim["2"]
    result = {
        "settings": {
            "requests": args.requests,
            "topics": args.topics,
            "budget_tokens": args.budget_tokens,
            "seed": args.seed,
            "k": 4,
            "follow_up_share": 0.2,
        },
        "simulation": sim,
        "simulated_replica_hit_ratio": round(two["affinity"]["hit_rate"] / one, 4),
        "simulated_affinity_vs_random_hit": round(
            two["affinity"]["hit_rate"] / two["power-of-two"]["hit_rate"], 4
        ),
        "affinity_vs_power_of_two_at_64": round(
            sim["64"]["affinity"]["hit_rate"] / sim["64"]["power-of-two"]["hit_rate"], 4
        ),
        "mean_imbalance_affinity": round(
            statistics.mean(sim[str(n)]["affinity"]["imbalance"] for n in REPLICAS if n > 1), 4
        ),
        "replica_hit_ratio": None,
        "affinity_vs_random_hit": None,
    }
    if not args.no_replicas:
        from benchmarks.scale_replicas import live_replicas

        result["live_replicas"] = live_replicas(requests=args.live_requests, seed=args.seed)
        for key in ("replica_hit_ratio", "affinity_vs_random_hit"):
            result[key] = result["live_replicas"][key]
            result[f"{key}_memory_bound"] = result["live_replicas"]["memory_bound"][key]
            result[f"{key}_conversations"] = result["live_replicas"]["conversations"][key]
    if not args.no_store:
        from benchmarks.scale_ingest import ray_vs_local, s3_store
        from ragcache.datasets import load_dataset

        result["ray_ingest"] = ray_vs_local(args.corpus)
        print(result["ray_ingest"], flush=True)
        questions = [q.question for q in load_dataset("python_docs").questions[:21]]
        result["s3"] = s3_store(args.corpus, questions)
        print(result["s3"], flush=True)
        for key in ("ray_ingest_vs_local", "ray_table_equal"):
            result[key] = result["ray_ingest"][key]
        for key in ("s3_ingest_ok", "s3_search_p50_ms"):
            result[key] = result["s3"][key]
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = write_results("scale", result)
    plot(result, path.with_suffix(".png"))
    print({k: v for k, v in result.items() if k != "simulation"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
