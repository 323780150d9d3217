"""Chunk reuse: a chunk's K/V copied into a prompt where it stands elsewhere, opt-in.

What must hold: the plan is sound (pure, property-tested); keys move exactly by rotation; a copy
put back where it was computed reproduces the exact tokens; with reuse off nothing changes, and
an assembled prompt never leaks into the exact prefix tree; models it cannot serve exactly fall
back to computing; an entry gone before assembly just means computing.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.cache.chunk_kv import (
    ASSEMBLED_MARK,
    CHUNK_MARK,
    assembled_key,
    chunk_key,
    plan_assembly,
    rerotate,
    rope_modules,
)
from ragcache.engine import Completion, Engine
from ragcache.errors import InvalidRequestError
from ragcache.model_loader import LoadedModel
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

rng = random.Random(7)
CHUNKS = {name: [rng.randrange(5, 300) for _ in range(60)] for name in "ABCDE"}
SYSTEM = list(range(1, 11))


def rag_prompt(names: str, question: list[int]) -> SegmentedPrompt:
    """[system][marker + chunk]...[question], the layout rag_prompt builds."""
    tokens, bounds, spans = list(SYSTEM), [len(SYSTEM)], []
    for i, name in enumerate(names):
        tokens += [400 + i, 401]  # the numbered marker: differs by position
        start = len(tokens)
        tokens += [*CHUNKS[name], 10]
        spans.append((start, len(tokens)))
        bounds.append(len(tokens))
    tokens += question
    bounds.append(len(tokens))
    kinds = ["system"] + ["chunk"] * len(names) + ["question"]
    return SegmentedPrompt(tokens, bounds, kinds, spans)


def params(mode: str) -> SamplingParams:
    return SamplingParams(max_tokens=12, stop_loops=False, chunk_reuse=mode, speculation="off")


def cold(loaded: LoadedModel, prompt: SegmentedPrompt) -> Completion:
    engine = Engine(loaded)
    try:
        return engine.generate(prompt, params("off"))
    finally:
        engine.close()


# -- the plan, pure ----------------------------------------------------------------------------
spans_strategy = st.lists(st.integers(1, 40), min_size=0, max_size=6).map(
    lambda lengths: [
        (sum(lengths[:i]) + 3 * i + 5, sum(lengths[: i + 1]) + 3 * i + 5)
        for i in range(len(lengths))
    ]
)


@given(
    spans_strategy,
    st.integers(0, 30),
    st.integers(0, 12),
    st.integers(1, 20),
    st.sets(st.integers(0, 5)),
)
def test_the_plan_covers_the_prompt_in_order_and_copies_only_chunk_tails(
    spans: list[tuple[int, int]], start: int, recompute: int, minimum: int, have: set[int]
) -> None:
    n = (spans[-1][1] if spans else 5) + 4
    start = min(start, n - 1)
    pieces = plan_assembly(n, start, spans, have.__contains__, recompute, minimum)
    cursor = start
    for piece in pieces:
        assert piece.start == cursor and piece.end > piece.start
        cursor = piece.end
        if piece.copied:
            assert piece.chunk is not None and piece.chunk in have
            a, b = spans[piece.chunk]
            assert a >= start and piece.start == a + recompute and piece.end <= b
            assert piece.end - piece.start >= minimum and piece.offset == recompute
    assert cursor == max(start, n - 1)  # the last token is left for the decoder, always computed
    assert not any(p.copied and p.end >= n for p in pieces)


def test_keys_move_by_rotation_exactly(tiny_llama: LoadedModel) -> None:
    ropes = rope_modules(tiny_llama.model)
    assert ropes is not None
    keys = mx.random.normal((1, 2, 9, ropes[0].dims))
    at_40 = ropes[0](keys, offset=40)  # as computed at positions 40..48
    at_3 = ropes[0](keys, offset=3)
    assert mx.allclose(rerotate(at_3, ropes[0], 37), at_40, atol=1e-5)
    assert mx.allclose(rerotate(at_40, ropes[0], -37), at_3, atol=1e-5)


# -- on a real tiny model ----------------------------------------------------------------------
@pytest.fixture
def engine(tiny_llama: LoadedModel):
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 28, chunk_min_tokens=8))
    engine = Engine(tiny_llama, cache=cache)
    yield engine
    engine.close()


def test_a_chunk_computed_before_is_copied_where_it_stands_now(engine: Engine) -> None:
    cache = engine.cache
    assert isinstance(cache, PrefixCache) and cache.chunk_unsupported is None
    first = engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
    assert first.stats.chunk_reused_tokens == 0  # nothing to copy yet
    assert cache.stats().chunk_entries == 3
    second = engine.generate(rag_prompt("ACD", [20, 21, 23]), params("epic"))
    # system + A from the exact prefix; C computed (never seen); D copied after its first tokens
    body = len(CHUNKS["D"]) + 1
    assert second.stats.chunk_reused_tokens == body - cache.settings.chunk_recompute_tokens
    s = second.stats
    assert s.cached_tokens + s.chunk_reused_tokens + s.recomputed_tokens == s.prompt_tokens
    assert second.lookup is not None and second.lookup.chunk_tokens == s.chunk_reused_tokens
    assert len(second.tokens) == 12


def test_a_copy_put_back_where_it_was_computed_gives_the_exact_tokens(
    tiny_llama: LoadedModel,
) -> None:
    """Same chunk, same context, same position: the copy must be the computed K/V (the keys
    went to the canonical position and back), so the tokens are the cold run's."""
    settings = CacheSettings(cache_bytes=1 << 28, chunk_recompute_tokens=0, chunk_min_tokens=8)
    cache = PrefixCache(tiny_llama, settings)
    engine = Engine(tiny_llama, cache=cache)
    try:
        prompt = rag_prompt("AB", [20, 21, 22])
        engine.generate(prompt, params("epic"))
        cache.invalidate([SYSTEM])  # every exact prefix goes; the chunk entries (no system) stay
        assert cache.tree.match(prompt.tokens).prefix_len == 0
        copied = engine.generate(prompt, params("epic"))
        assert copied.stats.chunk_reused_tokens == 2 * (len(CHUNKS["A"]) + 1)
        assert copied.tokens == cold(tiny_llama, prompt).tokens
    finally:
        engine.close()


def test_reuse_off_is_exact_and_an_assembled_prompt_never_becomes_an_exact_prefix(
    engine: Engine,
) -> None:
    engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
    assembled = rag_prompt("ACD", [20, 21, 23])
    reused = engine.generate(assembled, params("epic"))
    assert reused.stats.chunk_reused_tokens > 0
    exact = engine.generate(assembled, params("off"))
    assert exact.stats.chunk_reused_tokens == 0
    assert exact.tokens == cold(engine.loaded, assembled).tokens
    # what the tree holds of that prompt ends where the first copy began
    cache = engine.cache
    assert isinstance(cache, PrefixCache)
    first_copy = assembled.chunk_spans[2][0] + cache.settings.chunk_recompute_tokens
    assert exact.stats.cached_tokens <= first_copy


def test_chunk_entries_are_invisible_to_exact_lookups(engine: Engine) -> None:
    engine.generate(rag_prompt("AB", [20, 21]), params("epic"))
    cache = engine.cache
    assert isinstance(cache, PrefixCache)
    marks = [n for n in cache.tree.root.children.values() if n.tokens[0] == CHUNK_MARK]
    assert len(marks) == 1  # all entries under one mark, one budget with the prefixes
    assert cache.tree.match(chunk_key(CHUNKS["A"] + [10])).prefix_len == len(CHUNKS["A"]) + 2
    bare = SegmentedPrompt([*CHUNKS["A"], 10, 20, 21], [61, 63])
    assert engine.generate(bare, params("off")).stats.cached_tokens == 0


def test_an_entry_dropped_before_assembly_means_computing_not_a_wrong_answer(
    engine: Engine,
) -> None:
    engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
    cache = engine.cache
    assert isinstance(cache, PrefixCache)
    cache.invalidate([CHUNKS["D"][:5]])  # a re-ingested document drops its chunk's entry too
    assert cache.tree.match(chunk_key(CHUNKS["D"])).prefix_len == 1
    prompt = rag_prompt("CD", [20, 21, 23])
    got = engine.generate(prompt, params("epic"))
    assert got.stats.chunk_reused_tokens == 0
    assert got.tokens == cold(engine.loaded, prompt).tokens


def test_models_it_cannot_serve_exactly_fall_back_to_computing(tiny_gemma: LoadedModel) -> None:
    cache = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=1 << 28))
    assert cache.chunk_unsupported == "the model has sliding-window or recurrent layers"
    engine = Engine(tiny_gemma, cache=cache)
    try:
        engine.generate(rag_prompt("AB", [20, 21]), params("epic"))
        prompt = rag_prompt("CB", [20, 22])
        got = engine.generate(prompt, params("epic"))
        assert got.stats.chunk_reused_tokens == 0
        assert got.tokens == cold(tiny_gemma, prompt).tokens
        assert cache.stats().chunk_entries == 0
    finally:
        engine.close()


def test_chunk_reuse_runs_in_the_worker_batched(tiny_llama: LoadedModel) -> None:
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 28, chunk_min_tokens=8))
    engine = Engine(tiny_llama, cache=cache)
    worker = ModelWorker(engine, WorkerSettings(max_batch=4)).start()
    try:

        def done(ticket) -> Completion:
            return next(e for e in ticket.events(timeout=60) if isinstance(e, Completion))

        done(worker.submit(rag_prompt("ABC", [20]), params("epic")))
        tickets = [
            worker.submit(rag_prompt(names, [20, 30 + i]), params("epic"))
            for i, names in enumerate(["BAC", "CBA", "EAB"])
        ]
        results = [done(t) for t in tickets]
        assert all(r.stats.chunk_reused_tokens > 0 for r in results)
        assert all(r.stats.finish_reason in ("length", "stop") and r.tokens for r in results), [
            (r.stats.finish_reason, len(r.tokens)) for r in results
        ]
    finally:
        worker.stop()
        engine.close()


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="chunk reuse"):
        SamplingParams(chunk_reuse="blend-everything").validate()


def test_an_assembled_prompt_asked_again_is_restored_whole_with_the_same_answer(
    engine: Engine,
) -> None:
    """The second ask copies everything after the exact prefix in one piece (the stored
    assembled prompt): only the last token is computed, and the K/V is the first ask's, so
    the answer is too."""
    cache = engine.cache
    assert isinstance(cache, PrefixCache)
    engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
    prompt = rag_prompt("ACD", [20, 21, 23])
    first = engine.generate(prompt, params("epic"))
    assert first.stats.chunk_reused_tokens > 0
    again = engine.generate(prompt, params("epic"))
    s = again.stats
    assert s.recomputed_tokens == 1 and s.cached_tokens + s.chunk_reused_tokens == len(prompt) - 1
    # exact as far as the first ask computed exactly: up to where its first copy began
    assert s.cached_tokens == prompt.chunk_spans[2][0] + cache.settings.chunk_recompute_tokens
    assert again.tokens == first.tokens
    # a prompt that starts like it copies the stored one as far as they agree
    longer = rag_prompt("ACD", [20, 21, 23, 24, 25])
    follow = engine.generate(longer, params("epic"))
    assert follow.stats.cached_tokens + follow.stats.chunk_reused_tokens >= len(prompt)


def test_assembled_prompts_are_invisible_to_exact_lookups(engine: Engine) -> None:
    engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
    prompt = rag_prompt("ACD", [20, 21, 23])
    engine.generate(prompt, params("epic"))
    cache = engine.cache
    assert isinstance(cache, PrefixCache)
    assert ASSEMBLED_MARK in cache.tree.root.children
    assert cache.tree.match(assembled_key(prompt.tokens)).prefix_len == len(prompt) + 1
    exact = engine.generate(prompt, params("off"))
    assert exact.stats.chunk_reused_tokens == 0 and exact.stats.recomputed_tokens > 1
    assert exact.tokens == cold(engine.loaded, prompt).tokens
    cache.invalidate([CHUNKS["D"][:5]])  # a changed document takes its assembled prompts along
    assert ASSEMBLED_MARK not in cache.tree.root.children


def test_chunk_entries_and_assembled_prompts_survive_a_restart(
    tiny_llama: LoadedModel, tmp_path
) -> None:
    """Both live in the disk tier like prefixes: a new process on the same folder copies a
    chunk it never computed, and restores an assembled prompt it never assembled."""
    settings = CacheSettings(cache_bytes=1 << 28, chunk_min_tokens=8, disk_dir=tmp_path)
    first = PrefixCache(tiny_llama, settings)
    engine = Engine(tiny_llama, cache=first)
    try:
        engine.generate(rag_prompt("ABD", [20, 21, 22]), params("epic"))
        prompt = rag_prompt("ACD", [20, 21, 23])
        before = engine.generate(prompt, params("epic"))
    finally:
        engine.close()  # flushes the disk tier
    restarted = PrefixCache(tiny_llama, settings)
    engine = Engine(tiny_llama, cache=restarted)
    try:
        again = engine.generate(prompt, params("epic"))
        assert again.stats.recomputed_tokens == 1 and again.tokens == before.tokens
        other = engine.generate(rag_prompt("EB", [20, 24]), params("epic"))
        assert other.stats.chunk_reused_tokens > 0  # B's entry, from the folder
    finally:
        engine.close()
