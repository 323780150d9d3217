"""The model worker: batched decode gives each request what it gets alone; queue limits; cancel."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from ragcache import failpoints
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Completion, Engine, TextDelta
from ragcache.errors import ConfigError
from ragcache.model_loader import LoadedModel
from ragcache.runtime import (
    ModelWorker,
    QueueFullError,
    WorkerCrashedError,
    WorkerSettings,
    WorkerStoppedError,
)
from ragcache.sampling import SamplingParams
from ragcache.segments import encode_segments

TEXTS = [
    "The cache keeps the keys and values of every prefix it has seen.",
    "Retrieval finds the chunks of documents that answer a question.",
    "A radix tree stores token sequences with compressed edges.",
    "Sliding window attention keeps only the last few hundred positions.",
]


def result(ticket) -> Completion:
    events = list(ticket.events(timeout=60))
    assert isinstance(events[-1], Completion)
    text = "".join(e.text for e in events[:-1] if isinstance(e, TextDelta))
    assert text == events[-1].text
    return events[-1]


@pytest.fixture(params=["tiny_llama", "tiny_gemma"])
def loaded(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


def test_concurrent_requests_get_their_solo_tokens(loaded: LoadedModel) -> None:
    prompts = [encode_segments(loaded.tokenizer, [t, " and " + t]) for t in TEXTS]
    params = SamplingParams(max_tokens=10)
    solo = [Engine(loaded).generate(p, params).tokens for p in prompts]
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=1 << 28))
    worker = ModelWorker(Engine(loaded, cache=cache), WorkerSettings(max_batch=4))
    worker.start()
    try:
        tickets = [worker.submit(p, params) for p in prompts]
        done = [result(t) for t in tickets]
        assert [d.tokens for d in done] == solo
        assert all(d.stats.generated_tokens == 10 for d in done)
        # The same prompts again: restored from the cache, same tokens.
        again = [result(worker.submit(p, params)) for p in prompts]
        assert [d.tokens for d in again] == solo
        assert all(d.stats.cached_tokens > 0 for d in again)
    finally:
        worker.stop()


def test_stop_string_and_cancel(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXTS[0]])
    full = Engine(tiny_llama).generate(prompt, SamplingParams(max_tokens=12)).text
    worker = ModelWorker(Engine(tiny_llama))
    worker.start()
    try:
        stop = full[3:6]
        done = result(worker.submit(prompt, SamplingParams(max_tokens=12, stop=(stop,))))
        assert done.text == full[: full.index(stop)] and done.stats.finish_reason == "stop"
        ticket = worker.submit(prompt, SamplingParams(max_tokens=400))
        for i, _event in enumerate(ticket.events(timeout=60)):
            if i == 2:
                ticket.cancel()
        assert worker.in_flight == 0
    finally:
        worker.stop()


def test_full_queue_refuses_with_retry_after(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXTS[1]])
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings(max_queue=2, max_batch=1))
    worker.start()
    try:
        held = [worker.submit(prompt, SamplingParams(max_tokens=300)) for _ in range(2)]
        with pytest.raises(QueueFullError) as refused:
            worker.submit(prompt, SamplingParams(max_tokens=5))
        assert refused.value.http_status == 429 and refused.value.retry_after_s >= 1
        for t in held:
            t.cancel()
        for t in held:
            assert result(t).stats.finish_reason == "cancelled"
    finally:
        worker.stop()
    with pytest.raises(WorkerStoppedError):
        worker.submit(prompt)


def test_async_consumer_leaving_early_cancels(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXTS[2]])
    worker = ModelWorker(Engine(tiny_llama))
    worker.start()
    try:
        ticket = worker.submit(prompt, SamplingParams(max_tokens=500))

        async def read_two() -> None:
            n = 0
            async for _event in ticket.aevents():
                n += 1
                if n == 2:
                    break

        anyio.run(read_two)
        assert ticket.cancelled
        # The worker drops it at its next step.
        for _ in range(200):
            if worker.in_flight == 0:
                break
            threading.Event().wait(0.05)
        assert worker.in_flight == 0
    finally:
        worker.stop()


def test_call_runs_on_the_worker_thread(tiny_llama: LoadedModel) -> None:
    worker = ModelWorker(Engine(tiny_llama))
    worker.start()
    try:
        name = worker.call(lambda: threading.current_thread().name)
        assert name == "ragcache-model-worker"
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0)
    finally:
        worker.stop()


def test_loops_end_the_same_way_in_the_engine_and_the_worker(loaded: LoadedModel) -> None:
    """The random model falls into a loop; both generation paths stop there with the same tokens,
    a prefix of what it says when nothing stops it."""
    prompt = encode_segments(loaded.tokenizer, [TEXTS[1]])
    unguarded = Engine(loaded).generate(prompt, SamplingParams(max_tokens=96, stop_loops=False))
    solo = Engine(loaded).generate(prompt, SamplingParams(max_tokens=96))
    if solo.stats.finish_reason != "loop":
        pytest.skip("this random model did not loop on this prompt")
    assert solo.stats.generated_tokens < 96
    assert unguarded.tokens[: len(solo.tokens)] == solo.tokens
    worker = ModelWorker(Engine(loaded))
    worker.start()
    try:
        events = list(worker.submit(prompt, SamplingParams(max_tokens=96)).events(timeout=60))
    finally:
        worker.stop()
    done = events[-1]
    assert isinstance(done, Completion) and done.stats.finish_reason == "loop"
    assert done.tokens == solo.tokens and done.text == solo.text


@pytest.mark.parametrize("point", ["worker.on_token", "worker.join_batch", "worker.finish"])
def test_a_crash_fails_its_requests_loudly_and_the_worker_restarts(
    tiny_llama: LoadedModel, point: str
) -> None:
    prompts = [encode_segments(tiny_llama.tokenizer, [t]) for t in TEXTS]
    params = SamplingParams(max_tokens=6)
    solo = [Engine(tiny_llama).generate(p, params).tokens for p in prompts]
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 28))
    worker = ModelWorker(Engine(tiny_llama, cache=cache), WorkerSettings(max_batch=2))
    worker.start()
    try:
        assert [result(worker.submit(p, params)).tokens for p in prompts[:2]] == solo[:2]
        failpoints.arm(f"{point}=1")
        tickets = [worker.submit(p, params) for p in prompts]  # 2 running, 2 queued
        failed = 0
        for ticket in tickets:
            try:
                result(ticket)
            except WorkerCrashedError as exc:
                failed += 1
                assert exc.http_status == 503 and exc.retry_after_s > 0
        assert failed >= 2  # the batch that crashed; nothing hangs, nothing is lost silently
        assert worker.crashes == 1 and "InjectedFault" in (worker.last_crash or "")
        deadline = time.monotonic() + 10
        while not worker.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.healthy and worker.in_flight == 0
        assert cache.tree.problems(expect_unpinned=True) == []
        # Restarted: the same requests now complete, with the same tokens, reusing the cache.
        again = [result(worker.submit(p, params)) for p in prompts]
        assert [a.tokens for a in again] == solo
        assert again[0].stats.cached_tokens > 0
    finally:
        failpoints.arm("")
        worker.stop()


def test_failpoint_specs() -> None:
    assert failpoints.parse("a=3, b.c=1+") == {"a": (3, False), "b.c": (1, True)}
    for bad in ("a", "a=0", "=2", "a=x"):
        with pytest.raises(ConfigError):
            failpoints.parse(bad)


def test_done_callbacks_run_when_a_request_ends_read_or_not(tiny_llama: LoadedModel) -> None:
    # A client that left before reading its stream must still free what its request held
    # (serve releases the conversation this way).
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings()).start()
    try:
        ended = threading.Event()
        ticket = worker.submit(
            encode_segments(tiny_llama.tokenizer, [TEXTS[1]]), SamplingParams(max_tokens=3)
        )
        ticket.add_done_callback(ended.set)
        assert ended.wait(60)  # nobody read a single event
        late: list[int] = []
        ticket.add_done_callback(lambda: late.append(1))
        assert late == [1]  # already ended: called at once
        assert worker.in_flight == 0
    finally:
        worker.stop()
