"""RAG batches over a real LanceDB store on tmp_path and a tiny real model: every question
retrieves, the schedule puts questions with the same sources together, rerun skips answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.answer import Answerer
from ragcache.batch import BatchJob, BatchSettings, RagMode, WorkerRunner
from ragcache.batch.output import read_records
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel
from ragcache.retrieve import Retriever
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.store import open_store
from tests.ingest_support import embedder, generator_tokens, write_markdown_corpus

pytestmark = pytest.mark.slow  # loads the real embedder and ingests


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    root = tmp_path_factory.mktemp("rag-batch")
    write_markdown_corpus(root / "docs", 6, paragraphs=2)
    spec = JobSpec(paths=(str(root / "docs"),), db_dir=root / "db")
    run_job(spec, home, embedder=embedder(), tokens=generator_tokens())
    return root / "db"


def run(loaded: LoadedModel, db: Path, questions: Path, answers: Path, schedule: str):
    # Room for about two prompts' KV: reuse needs the sharers close together in the run.
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=2 << 20))
    answerer = Answerer(
        Engine(loaded, cache=cache),
        Retriever(open_store(db), embedder()),
    )
    worker = ModelWorker(answerer.engine, WorkerSettings(max_batch=4))
    worker.start()
    try:
        settings = BatchSettings(schedule=schedule, max_tokens=4, wait_min_tokens=16, fsync=False)
        job = BatchJob(
            questions, answers, RagMode(answerer, k=2), WorkerRunner(worker, 4), settings
        )
        return job, job.run()
    finally:
        worker.stop()


def test_scheduled_rag_batch_shares_more_and_resumes(
    tiny_llama: LoadedModel, db: Path, tmp_path: Path
) -> None:
    topics = ["caching results", "vector embeddings", "LanceDB storage", "BM25 search"]
    lines = [
        json.dumps({"id": f"q{i}", "question": f"What about {topics[i % 4]}, item {i}?"})
        for i in range(12)
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    shared = {}
    for schedule in ("fifo", "prefix"):
        answers = tmp_path / f"{schedule}.jsonl"
        job, status = run(tiny_llama, db, questions, answers, schedule)
        assert (status.answered, status.failed) == (12, 0)
        records = read_records(answers)
        assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(12))
        assert all(r["usage"]["prompt_tokens"] > r["usage"]["cached_tokens"] >= 0 for r in records)
        shared[schedule] = status.cached_tokens
    # Same prompts in another order: grouping questions by their sources restores more.
    assert shared["prefix"] > shared["fifo"]
    job, status = run(tiny_llama, db, questions, tmp_path / "prefix.jsonl", "prefix")
    assert (status.skipped, status.answered) == (12, 0)
