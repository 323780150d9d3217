"""Long-context batches on tiny real models: every question after the first restores the whole
document (past the sliding window), batched answers equal cold ones, bad input gets its own line,
and a rerun finishes what an interrupted run left."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ragcache.batch import (
    BatchJob,
    BatchSettings,
    Document,
    EmptyBatchError,
    LongContextMode,
    LongContextSettings,
    SequentialRunner,
    WorkerRunner,
)
from ragcache.batch.output import read_records
from ragcache.batch.runners import Finished
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Engine
from ragcache.errors import PromptTooLongError
from ragcache.model_loader import LoadedModel
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.sampling import SamplingParams

WORDS = [
    "cache",
    "tree",
    "token",
    "prefix",
    "window",
    "layer",
    "chunk",
    "answer",
    "value",
    "key",
    "memory",
    "node",
]
SMALL = LongContextSettings(segment_tokens=40)  # > the tiny gemma's 24-token window


def document(n_words: int, seed: int = 0) -> Document:
    words = [WORDS[(i * 7 + seed * 3 + i // 5) % len(WORDS)] for i in range(n_words)]
    return Document("notes.txt", " ".join(words) + ".")


def write_questions(path: Path, n: int, extra: list[str] = ()) -> Path:
    lines = [
        json.dumps({"id": f"q{i}", "question": f"What about {WORDS[i % 12]} {i}?"})
        for i in range(n)
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


@pytest.fixture(params=["tiny_gemma", "tiny_llama"])
def loaded(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


def cached_engine(loaded: LoadedModel) -> Engine:
    return Engine(loaded, cache=PrefixCache(loaded, CacheSettings(cache_bytes=1 << 28)))


def by_id(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_records(path) if r["error"] is None}


def test_worker_batches_restore_the_document_and_match_cold_answers(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    mode = LongContextMode(loaded, [document(200)], SMALL)
    assert mode.prefix_tokens > 100
    questions = write_questions(tmp_path / "q.jsonl", 10)
    settings = BatchSettings(max_tokens=6, wait_min_tokens=32, fsync=False)
    worker = ModelWorker(cached_engine(loaded), WorkerSettings(max_batch=4))
    worker.start()
    try:
        job = BatchJob(questions, tmp_path / "a.jsonl", mode, WorkerRunner(worker, 4), settings)
        status = job.run()
    finally:
        worker.stop()
    assert (status.state, status.answered, status.failed) == ("completed", 10, 0)
    finished = sorted(job.finished(), key=lambda f: f.started)
    # The first question computes the document; every other one restores all of it.
    assert finished[0].completion.stats.cached_tokens == 0
    assert all(f.completion.stats.cached_tokens >= mode.prefix_tokens for f in finished[1:])
    assert status.hit_rate > 0.8
    cold = Engine(loaded)
    answers = by_id(tmp_path / "a.jsonl")
    for f in finished:
        solo = cold.generate(f.item.prompt, SamplingParams(max_tokens=6))
        assert answers[f.item.request.id]["answer"] == solo.text
        usage = answers[f.item.request.id]["usage"]
        assert usage["cached_tokens"] == f.completion.stats.cached_tokens
        assert usage["prompt_tokens"] == len(f.item.prompt.tokens)


def test_bad_lines_duplicates_and_a_too_long_question_get_their_own_lines(
    tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    mode = LongContextMode(tiny_gemma, [document(120)], SMALL)
    room = tiny_gemma.context_length - mode.prefix_tokens
    huge = "cache " * (room + 10)
    extra = [
        "{broken",
        json.dumps({"id": "q1", "question": "duplicate"}),
        json.dumps({"id": "long", "question": huge}),
    ]
    questions = write_questions(tmp_path / "q.jsonl", 3, extra)
    answers = tmp_path / "a.jsonl"
    engine = cached_engine(tiny_gemma)
    settings = BatchSettings(max_tokens=3, fsync=False)
    status = BatchJob(questions, answers, mode, SequentialRunner(engine), settings).run()
    assert (status.answered, status.failed, status.input_errors) == (3, 1, 2)
    records = read_records(answers)
    errors = {r["line"]: r["error"] for r in records if r["error"]}
    assert errors[4]["type"] == "bad_line"
    assert errors[5]["type"] == "duplicate_id"
    assert errors[6]["type"] == "PromptTooLongError" and "too many" in errors[6]["message"]
    assert len(records) == 6
    # A rerun: answers and input errors stay, the failed question is tried again (and fails again).
    status = BatchJob(questions, answers, mode, SequentialRunner(engine), settings).run()
    assert (status.skipped, status.answered, status.failed) == (3, 0, 1)
    again = read_records(answers)
    assert again == records[:2] + records[3:] + records[2:3]


def test_cancel_then_rerun_answers_each_id_once(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    mode = LongContextMode(tiny_llama, [document(80)], SMALL)
    questions = write_questions(tmp_path / "q.jsonl", 8)
    answers = tmp_path / "a.jsonl"
    engine = cached_engine(tiny_llama)
    settings = BatchSettings(max_tokens=4, fsync=False)
    job = BatchJob(questions, answers, mode, SequentialRunner(engine), settings)

    def cancel_after_three(f: Finished, log, bar, done=job._done) -> None:
        done(f, log, bar)
        if job.status().answered >= 3:
            job.cancel()

    job._done = cancel_after_three  # the job's own writer, stopped part way as Ctrl-C would
    status = job.run()
    assert status.state == "cancelled" and status.answered == 3
    status = BatchJob(questions, answers, mode, SequentialRunner(engine), settings).run()
    assert (status.state, status.skipped, status.answered) == ("completed", 3, 5)
    ids = [r["id"] for r in read_records(answers)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(8))


def test_status_and_cancel_from_another_thread(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    mode = LongContextMode(tiny_llama, [document(60)], SMALL)
    questions = write_questions(tmp_path / "q.jsonl", 40)
    answers = tmp_path / "a.jsonl"
    worker = ModelWorker(cached_engine(tiny_llama), WorkerSettings(max_batch=4))
    worker.start()
    try:
        settings = BatchSettings(max_tokens=40, fsync=False)
        job = BatchJob(questions, answers, mode, WorkerRunner(worker, 4), settings)
        job.start()
        seen = threading.Event()
        for _ in range(600):
            if job.status().answered >= 2:
                seen.set()
                break
            job.wait(0.05)
        job.cancel()
        status = job.wait(60)
    finally:
        worker.stop()
    assert seen.is_set()
    assert status.state == "cancelled" and 2 <= status.answered < 40
    assert len(read_records(answers)) == status.answered


def test_documents_longer_than_the_context_say_by_how_much(tiny_gemma: LoadedModel) -> None:
    with pytest.raises(PromptTooLongError, match=r"tokens too many before any question"):
        LongContextMode(tiny_gemma, [document(6000)], SMALL)


def test_empty_questions_file(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text("\n\n")
    mode = LongContextMode(tiny_llama, [document(20)], SMALL)
    job = BatchJob(
        tmp_path / "q.jsonl", tmp_path / "a.jsonl", mode, SequentialRunner(Engine(tiny_llama))
    )
    with pytest.raises(EmptyBatchError, match="no questions"):
        job.run()
    assert job.status().state == "failed" and not (tmp_path / "a.jsonl").exists()
