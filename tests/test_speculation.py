"""Prompt-lookup speculation: drafts from an n-gram index, verified in one pass, never changing
the tokens greedy decoding gives (alone or batched, with or without the prefix cache)."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Completion, Engine, TextDelta
from ragcache.errors import ConfigError, InvalidRequestError
from ragcache.model_loader import LoadedModel
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.runtime.lookup import DraftLength, LookupSettings, PromptLookup
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.settings import GenerationSettings


# -- the index, pure ---------------------------------------------------------------------------
def naive_draft(seq: list[int], s: LookupSettings, length: int) -> list[int]:
    """The definition: the latest earlier occurrence of the longest suffix, its continuation."""
    for n in range(min(s.max_ngram, len(seq)), s.min_ngram - 1, -1):
        suffix = seq[len(seq) - n :]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == suffix:
                return seq[start + n : start + n + length]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60), st.integers(1, 8))
def test_the_index_drafts_what_a_scan_of_the_sequence_would(seq: list[int], length: int) -> None:
    s = LookupSettings()
    lookup = PromptLookup([], s)
    for i, token in enumerate(seq):
        lookup.append(token)
        assert lookup.draft(length) == naive_draft(seq[: i + 1], s, length)


@given(st.lists(st.integers(0, 10_000), unique=True, max_size=50))
def test_a_sequence_with_no_repeat_drafts_nothing(seq: list[int]) -> None:
    assert PromptLookup(seq).draft(8) == []


def test_draft_length_adapts_and_bad_settings_are_refused() -> None:
    length = DraftLength(LookupSettings(max_draft=8, initial_draft=4))
    length.update(4, 4)
    assert length.value == 6
    length.update(6, 1)
    assert length.value == 5
    bad_settings = (
        LookupSettings(max_draft=0),
        LookupSettings(max_draft=33),
        LookupSettings(min_ngram=3, max_ngram=2),
    )
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            bad.validate()
    with pytest.raises(InvalidRequestError, match="speculation"):
        SamplingParams(speculation="medusa").validate()


# -- exactness on real (tiny) models -----------------------------------------------------------
def repetitive_prompt(seed: int, n: int = 90) -> SegmentedPrompt:
    """Text that repeats phrases, as RAG prompts do (sources quoted, names repeated)."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(5, 300) for _ in range(rng.randrange(3, 7))] for _ in range(6)]
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += rng.choice(phrases)
    return SegmentedPrompt(tokens[:n], [n // 2, n])


def run(engine: Engine, prompt: SegmentedPrompt, mode: str, **kw: object) -> Completion:
    params = SamplingParams(max_tokens=40, stop_loops=False, speculation=mode, **kw)  # type: ignore[arg-type]
    return engine.generate(prompt, params)


@pytest.fixture(params=["tiny_llama", "tiny_gemma"])
def loaded(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("cached", [False, True])
def test_speculative_greedy_equals_plain_greedy(loaded: LoadedModel, cached: bool) -> None:
    cache = PrefixCache(loaded, CacheSettings(cache_bytes=1 << 28)) if cached else None
    engine = Engine(loaded, cache=cache)
    accepted = 0
    try:
        for seed in range(6):
            prompt = repetitive_prompt(seed)
            plain = run(engine, prompt, "off")
            fast = run(engine, prompt, "lookup")
            assert fast.tokens == plain.tokens and fast.text == plain.text, seed
            assert fast.stats.finish_reason == plain.stats.finish_reason
            assert plain.stats.drafted_tokens == 0
            accepted += fast.stats.accepted_tokens
            if cached:
                assert fast.stats.cached_tokens > 0
    finally:
        engine.close()
    if loaded.family == "llama":  # plain KV: the model copies its own loops, drafts get accepted
        assert accepted > 0
    # gemma's 24-token window has wrapped on these prompts: no draft may be checked there, since a
    # rejected token could not be cut back out of the window
    else:
        assert accepted == 0


@pytest.mark.parametrize("prompt_tokens", [90, 12])
def test_a_window_that_cannot_take_a_draft_decodes_in_the_batch(
    tiny_gemma: LoadedModel, prompt_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma's 24-token window has wrapped after a 90-token prompt: the sequence never goes solo
    (no speculative step). After a 12-token one it goes solo, and moves into the batch when its
    window fills. Either way, the tokens of plain greedy decoding."""
    moved = []
    merge = ModelWorker._merge_solo

    def counted(worker: ModelWorker) -> None:
        moved.append(1)
        merge(worker)

    monkeypatch.setattr(ModelWorker, "_merge_solo", counted)
    engine = Engine(tiny_gemma)
    try:
        for seed in range(3):
            prompt = repetitive_prompt(seed, prompt_tokens)
            plain = run(engine, prompt, "off")
            fast = run(engine, prompt, "lookup")
            assert fast.tokens == plain.tokens and fast.text == plain.text, seed
            if prompt_tokens > 24:
                assert fast.stats.decode_steps == 0 and fast.stats.drafted_tokens == 0
            else:  # solo until the window filled (room: 24 - 12 - 2), then in the batch
                assert len(fast.tokens) > 24
                assert 0 < fast.stats.decode_steps <= 24 - prompt_tokens - 2 + 1
    finally:
        engine.close()
    assert len(moved) == (0 if prompt_tokens > 24 else 3)


def test_a_stop_string_inside_an_accepted_draft_ends_where_plain_decoding_does(
    tiny_llama: LoadedModel,
) -> None:
    engine = Engine(tiny_llama)
    try:
        prompt = repetitive_prompt(1)
        plain = run(engine, prompt, "off")
        fast = run(engine, prompt, "lookup")
        assert fast.stats.accepted_tokens > 0
        # a stop string made of text from the middle of the answer, where drafts were accepted
        stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
        assert stop.strip()
        cut_plain = run(engine, prompt, "off", stop=(stop,))
        cut_fast = run(engine, prompt, "lookup", stop=(stop,))
        assert cut_fast.text == cut_plain.text and cut_fast.tokens == cut_plain.tokens
        assert cut_fast.stats.finish_reason == cut_plain.stats.finish_reason == "stop"
        # the cache covers nothing after the stop: a follow-up equals a cold run
        follow = SegmentedPrompt(prompt.tokens + cut_fast.tokens, [len(prompt.tokens)])
        assert run(engine, follow, "lookup").tokens == run(Engine(tiny_llama), follow, "off").tokens
    finally:
        engine.close()


def test_requests_that_batch_together_get_their_solo_tokens(tiny_llama: LoadedModel) -> None:
    prompts = [repetitive_prompt(s) for s in range(4)]
    solo = Engine(tiny_llama)
    expected = [run(solo, p, "off").tokens for p in prompts]
    solo.close()
    engine = Engine(tiny_llama, cache=PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 28)))
    worker = ModelWorker(engine, WorkerSettings(max_batch=4)).start()
    try:
        params = SamplingParams(max_tokens=40, stop_loops=False)
        # the first one starts alone (speculating), the others join it mid-answer
        first = worker.submit(prompts[0], params)
        first_events = first.events(timeout=60)
        assert isinstance(next(first_events), TextDelta)
        tickets = [worker.submit(p, params) for p in prompts[1:]]
        done = [next(e for e in first_events if isinstance(e, Completion))]
        done += [
            next(e for e in t.events(timeout=60) if isinstance(e, Completion)) for t in tickets
        ]
        assert [d.tokens for d in done] == expected
        assert done[0].stats.decode_steps > 0  # it did speculate before the others joined
    finally:
        worker.stop()


def test_requests_arriving_together_decode_as_one_batch_from_the_start(
    tiny_llama: LoadedModel,
) -> None:
    """A short prompt that finishes its prefill while longer ones are still prefilling does not
    start speculating alone only to be merged back a few steps later: it decodes in the batch
    (speculation's merge made 8 concurrent requests 0.88x as fast as with it off)."""
    prompts = [repetitive_prompt(0)] + [repetitive_prompt(s, 600) for s in range(1, 4)]
    settings = GenerationSettings(prefill_step_size=32)  # the long ones prefill in ~19 steps
    solo = Engine(tiny_llama, settings)
    expected = [run(solo, p, "off").tokens for p in prompts]
    solo.close()
    worker = ModelWorker(Engine(tiny_llama, settings), WorkerSettings(max_batch=4)).start()
    try:
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:  # the worker waits between steps until every request is queued
            entered.set()
            release.wait(30)

        held = threading.Thread(target=worker.call, args=(hold,))
        held.start()
        assert entered.wait(30)
        params = SamplingParams(max_tokens=40, stop_loops=False)
        tickets = [worker.submit(p, params) for p in prompts]
        release.set()
        held.join()
        done = [next(e for e in t.events(timeout=60) if isinstance(e, Completion)) for t in tickets]
        assert [d.tokens for d in done] == expected
        assert all(d.stats.decode_steps == 0 for d in done)  # no speculative steps alone
    finally:
        worker.stop()


def test_with_one_slot_a_request_speculates_though_others_wait(tiny_llama: LoadedModel) -> None:
    """With max_batch 1 nothing can ever batch with it: the queue is no reason to decode plainly."""
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings(max_batch=1)).start()
    try:
        params = SamplingParams(max_tokens=20, stop_loops=False)
        tickets = [worker.submit(repetitive_prompt(s), params) for s in range(3)]
        done = [next(e for e in t.events(timeout=60) if isinstance(e, Completion)) for t in tickets]
        assert all(d.stats.decode_steps > 0 for d in done)
    finally:
        worker.stop()
