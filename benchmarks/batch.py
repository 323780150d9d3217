"""Benchmark of batch querying, every figure measured in this run.

    .venv/bin/python benchmarks/batch.py           # ~15-20 minutes on 2 CPU cores
    .venv/bin/python benchmarks/batch.py --quick   # small sizes, a smoke run

Long-context (gemma3-270m, 512-token sliding window): 100 questions over one ~8k-token document,
run scheduled + batched (ModelWorker) + cached, against
- the ideal: one cold prefill of the document, plus each question's own prefill and decode on a
  prefix that is already there (restore time excluded; measured on a sample of questions, scaled);
- the baseline: first-in-first-out, one at a time, no cache (a sample: every such question costs
  the same full prefill), for `batched_vs_sequential` throughput.
RAG (smollm2-135m-instruct, the bundled python_docs corpus): 200 questions scheduled vs FIFO with
the same worker, cache and budget: token hit rate and wall time.

Writes benchmarks/results/batch.json (the issue's keys, goals, raw figures, sizes) and PNGs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ragcache  # noqa: E402,F401,I001  (fast BLAS before mlx: keep this import first)
from ragcache.batch import (  # noqa: E402
    BatchJob,
    BatchSettings,
    Document,
    LongContextMode,
    RagMode,
    SequentialRunner,
    WorkerRunner,
)
from ragcache.cache import CacheSettings, PrefixCache  # noqa: E402
from ragcache.datasets import load_dataset  # noqa: E402
from ragcache.engine import Engine  # noqa: E402
from ragcache.model_loader import LoadedModel, load_model  # noqa: E402
from ragcache.settings import load_settings  # noqa: E402
from ragcache.runtime import ModelWorker, WorkerSettings  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
GIB = 1 << 30
GOALS = {
    "longdoc_token_hit": ">= 0.95",
    "longdoc_wall_vs_ideal": "<= 1.2",
    "batched_vs_sequential": ">= 3",
}


@dataclass(frozen=True)
class Sizes:
    doc_tokens: int = 8000
    questions: int = 100
    max_tokens: int = 8
    max_batch: int = 8
    baseline_sample: int = 2  # FIFO, no cache: each pays the whole document
    ideal_sample: int = 12
    # The issue asks for 200; at ~6 s per RAG question on this shared 2-core machine, two runs of
    # 200 would take ~40 minutes, so the default is 60 (a third of them reworded repeats).
    rag_questions: int = 60
    rag_reworded: int = 20
    rag_k: int = 3
    rag_cache_gib: float = 0.25


QUICK = Sizes(1500, 12, 4, 4, 2, 4, 12, 4, 3, 0.1)


def write_questions(path: Path, questions: list[str]) -> Path:
    lines = [json.dumps({"id": f"q{i:03d}", "question": q}) for i, q in enumerate(questions)]
    path.write_text("\n".join(lines) + "\n")
    return path


def dataset_questions(n: int, reworded: int = 0) -> list[str]:
    """n FAQ questions: the first n - reworded, then the first `reworded` of them again in other
    words (same sources, new text), as a batch that asks about a topic twice would."""
    base = [q.question for q in load_dataset().questions]
    fresh = base[: n - reworded]
    return fresh + [f"In short: {q}" for q in fresh[:reworded]]


def long_document(loaded: LoadedModel, n_tokens: int) -> Document:
    """FAQ pages of the bundled corpus, joined until the document holds about n_tokens."""
    corpus = load_dataset().corpus_dir
    parts, total = [], 0
    for path in sorted(corpus.glob("faq/**/*.rst")):
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(loaded.tokenizer.encode(text, add_special_tokens=False))
        if total >= n_tokens:
            break
    text = "\n\n".join(parts)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return Document("python-faq.rst", loaded.tokenizer.decode(ids))


def run_job(job: BatchJob) -> tuple[float, dict]:
    start = time.perf_counter()
    status = job.run()
    wall = time.perf_counter() - start
    assert status.failed == 0, status
    return wall, status.as_dict()


class _Restored:
    """A PrefixCacheLike that hands out one session restored beforehand and stores nothing, so
    an engine run measures the question's own prefill and decode and nothing else."""

    def __init__(self, session) -> None:
        self.session = session
        session.capture_positions = []
        session.capture = lambda position: None
        session.finish = lambda tokens: session.abort()

    def begin(self, tokens, boundaries):
        return self.session


def bench_longdoc(home: Path, sizes: Sizes, tmp: Path) -> dict:
    loaded = load_model("gemma3-270m", home)
    doc = long_document(loaded, sizes.doc_tokens)
    mode = LongContextMode(loaded, [doc])
    questions = write_questions(tmp / "long_q.jsonl", dataset_questions(sizes.questions))
    settings = BatchSettings(max_tokens=sizes.max_tokens, fsync=False)

    # Scheduled, batched, cached.
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=4 * GIB))
    engine = Engine(loaded, cache=cache)
    worker = ModelWorker(engine, WorkerSettings(max_batch=sizes.max_batch))
    worker.start()
    try:
        runner = WorkerRunner(worker, sizes.max_batch)
        job = BatchJob(questions, tmp / "long_a.jsonl", mode, runner, settings)
        wall, status = run_job(job)
    finally:
        worker.stop()
    finished = sorted(job.finished(), key=lambda f: f.started)
    items = {f.item.request.id: f.item for f in finished}

    # The ideal's per-question part: restore first (untimed), then the question alone.
    ideal_q = []
    for f in finished[1 : 1 + sizes.ideal_sample]:
        session = cache.begin(f.item.prompt.tokens, f.item.prompt.boundaries)
        assert session.start >= mode.prefix_tokens
        own = Engine(loaded, cache=_Restored(session)).generate(f.item.prompt, f.item.params)
        ideal_q.append(own.stats.prefill_s + own.stats.decode_s)

    # Baseline: FIFO, one at a time, no cache, on the first questions of the file.
    base_q = write_questions(tmp / "base_q.jsonl", dataset_questions(sizes.baseline_sample))
    base_settings = BatchSettings(schedule="fifo", max_tokens=sizes.max_tokens, fsync=False)
    plain = Engine(loaded)
    base_job = BatchJob(base_q, tmp / "base_a.jsonl", mode, SequentialRunner(plain), base_settings)
    base_wall, base_status = run_job(base_job)
    base_finished = base_job.finished()
    doc_prefill_s = statistics.median(f.completion.stats.prefill_s for f in base_finished)

    ideal_s = doc_prefill_s + sizes.questions * statistics.mean(ideal_q)
    throughput = sizes.questions / wall
    base_throughput = sizes.baseline_sample / base_wall
    cached = [f.completion.stats.cached_tokens for f in finished]
    return {
        "longdoc_token_hit": status["cached_tokens"] / status["prompt_tokens"],
        "longdoc_wall_vs_ideal": wall / ideal_s,
        "batched_vs_sequential": throughput / base_throughput,
        "measurements": {
            "model": loaded.name,
            "document_prefix_tokens": mode.prefix_tokens,
            "questions": sizes.questions,
            "wall_s": wall,
            "ideal_s": ideal_s,
            "doc_cold_prefill_s": doc_prefill_s,
            "question_only_s_mean": statistics.mean(ideal_q),
            "question_only_sample": len(ideal_q),
            "throughput_q_per_s": throughput,
            "baseline_wall_s": base_wall,
            "baseline_sample": sizes.baseline_sample,
            "baseline_throughput_q_per_s": base_throughput,
            "baseline_per_question_s": base_wall / sizes.baseline_sample,
            "first_question_cached_tokens": cached[0],
            "later_questions_min_cached_tokens": min(cached[1:]) if len(cached) > 1 else None,
            "later_questions_restoring_whole_document": sum(
                c >= mode.prefix_tokens for c in cached[1:]
            ),
            "status": status,
            "baseline_status": base_status,
            "ttft_s": [round(f.completion.stats.ttft_s, 3) for f in finished],
            "cached_tokens": cached,
            "items": len(items),
        },
    }


def bench_rag(home: Path, sizes: Sizes, tmp: Path, db: Path) -> dict:
    from ragcache.stack import StackOptions, build_stack

    settings = load_settings()
    questions = write_questions(
        tmp / "rag_q.jsonl", dataset_questions(sizes.rag_questions, sizes.rag_reworded)
    )
    out: dict = {}
    for schedule in ("fifo", "prefix"):
        options = StackOptions(
            db_dir=db,
            cache_dir_off=True,
            cache_settings=CacheSettings(cache_bytes=int(sizes.rag_cache_gib * GIB)),
        )
        stack = build_stack(settings, options)
        worker = ModelWorker(stack.engine, WorkerSettings(max_batch=sizes.max_batch))
        worker.start()
        try:
            job = BatchJob(
                questions,
                tmp / f"rag_{schedule}.jsonl",
                RagMode(stack.answerer, k=sizes.rag_k),
                WorkerRunner(worker, sizes.max_batch),
                BatchSettings(schedule=schedule, max_tokens=sizes.max_tokens, fsync=False),
            )
            wall, status = run_job(job)
        finally:
            worker.stop()
        out[schedule] = {"wall_s": wall, "hit_rate": status["hit_rate"], "status": status}
        out["model"] = stack.loaded.name
    return out


def plot(long: dict, rag: dict, sizes: Sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = long["measurements"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["scheduled+batched\n+cached", "ideal", "FIFO one-at-a-time\nno cache (scaled)"]
    values = [m["wall_s"], m["ideal_s"], m["baseline_per_question_s"] * sizes.questions]
    ax[0].bar(labels, values, color=["tab:green", "tab:gray", "tab:red"])
    ax[0].set_yscale("log")
    ax[0].set_ylabel("wall time for all questions (s, log)")
    ax[0].set_title(f"{sizes.questions} questions over a {m['document_prefix_tokens']}-token doc")
    ax[1].plot(m["cached_tokens"], marker=".", linestyle="none")
    ax[1].axhline(m["document_prefix_tokens"], color="gray", linestyle="--", label="document")
    ax[1].set_xlabel("question (run order)")
    ax[1].set_ylabel("prompt tokens restored from cache")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(OUT / "batch_longdoc.png", dpi=120)

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    names = ["fifo", "prefix"]
    ax[0].bar(names, [rag[n]["hit_rate"] for n in names], color=["tab:red", "tab:green"])
    ax[0].set_ylabel("token hit rate")
    ax[1].bar(names, [rag[n]["wall_s"] for n in names], color=["tab:red", "tab:green"])
    ax[1].set_ylabel("wall time (s)")
    fig.suptitle(f"RAG batch, {sizes.rag_questions} questions: scheduled vs first-in-first-out")
    fig.tight_layout()
    fig.savefig(OUT / "batch_rag.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="a store of the python_docs corpus (default: ingested into HOME/bench/pydocs-db)",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    settings = load_settings()
    db = args.db or settings.home / "bench" / "pydocs-db"
    if not db.exists():
        from ingest.pipeline import JobSpec, run_job

        run_job(JobSpec(paths=(str(load_dataset().corpus_dir),), db_dir=db), settings.home)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        long = bench_longdoc(settings.home, sizes, Path(tmp))
        print(json.dumps({k: v for k, v in long.items() if k != "measurements"}), flush=True)
        rag = bench_rag(settings.home, sizes, Path(tmp), db)
    results = {
        "longdoc_token_hit": round(long["longdoc_token_hit"], 4),
        "longdoc_wall_vs_ideal": round(long["longdoc_wall_vs_ideal"], 3),
        "batched_vs_sequential": round(long["batched_vs_sequential"], 2),
        "rag_scheduled_hit_rate": rag["prefix"]["hit_rate"],
        "rag_fifo_hit_rate": rag["fifo"]["hit_rate"],
        "rag_scheduled_wall_s": round(rag["prefix"]["wall_s"], 1),
        "rag_fifo_wall_s": round(rag["fifo"]["wall_s"], 1),
        "goals": GOALS,
        "met": {
            "longdoc_token_hit": long["longdoc_token_hit"] >= 0.95,
            "longdoc_wall_vs_ideal": long["longdoc_wall_vs_ideal"] <= 1.2,
            "batched_vs_sequential": long["batched_vs_sequential"] >= 3,
        },
        "measurements": {"longdoc": long["measurements"], "rag": rag},
        "setup": {**sizes.__dict__, "quick": args.quick, "total_s": time.perf_counter() - started},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = "batch_quick.json" if args.quick else "batch.json"
    (OUT / name).write_text(json.dumps(results, indent=2, default=float) + "\n")
    plot(long, rag, sizes)
    print(json.dumps({k: results[k] for k in list(results)[:7]}, indent=2))


if __name__ == "__main__":
    main()
