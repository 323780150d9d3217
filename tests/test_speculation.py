"""Prompt-lookup speculation: drafts from an n-gram index, verified in one pass, never changing
the tokens greedy decoding gives (alone or batched, with or without the prefix cache)."""

from __future__ import annotations

import copy
import random
import threading
from dataclasses import replace

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import (
    BatchRotatingKVCache,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Completion, Engine, TextDelta
from ragcache.errors import ConfigError, InvalidRequestError
from ragcache.model_loader import LoadedModel
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.runtime.lookup import (
    DraftLength,
    DraftPayoff,
    DraftRecord,
    LookupSettings,
    PromptLookup,
)
from ragcache.runtime.speculate import CannotCutBack, SpeculativeDecoder, cut_back
from ragcache.runtime.ticket import Ticket
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
        LookupSettings(judge_after=-1),
        LookupSettings(min_gain=0),
        LookupSettings(min_gain=float("nan")),
        LookupSettings(probe_every=0),
    )
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            bad.validate()
    with pytest.raises(InvalidRequestError, match="speculation"):
        SamplingParams(speculation="medusa").validate()


@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.floats(0.01, 1.0), st.integers(0, 6), st.integers(1, 7)), max_size=30),
)
def test_drafting_pays_while_its_tokens_per_second_beat_plain_steps(
    judge_after: int, steps: list[tuple[float, int, int]]
) -> None:
    def judged(steps: list[tuple[float, int, int]]) -> bool | None:
        with_draft = [(t, min(o, d + 1)) for t, d, o in steps if d]
        without = [t for t, d, _ in steps if not d]
        if len(with_draft) < judge_after or len(without) < judge_after:
            return None
        rate = sum(o for _, o in with_draft) / sum(t for t, _ in with_draft)
        return rate >= len(without) / sum(without)

    payoff = DraftPayoff(judge_after)
    for i, (seconds, drafted, out) in enumerate(steps):
        payoff.add(seconds, drafted, min(out, drafted + 1))
        assert payoff.pays == judged(steps[: i + 1])
        # once judged not to pay, it stays so: no more drafts for the sequence
        assert payoff.gave_up == any(judged(steps[: j + 1]) is False for j in range(i + 1))
        drafted_steps = sum(1 for _, d, _ in steps[: i + 1] if d)
        plain_steps = i + 1 - drafted_steps
        assert payoff.wants_plain_step == (
            not payoff.gave_up and drafted_steps >= judge_after > plain_steps
        )
    assert DraftPayoff(0).pays is None and not DraftPayoff(0).wants_plain_step  # never judged


def _payoff(
    drafted: int, plain: int, drafted_s: float, plain_s: float, out: int, judged: bool = True
) -> DraftPayoff:
    """A finished sequence's measurement: `drafted` steps that gave `out` tokens in
    `drafted_s`, and `plain` steps in `plain_s`; `judged`: enough of each for its own verdict."""
    payoff = DraftPayoff(judge_after=min(drafted, plain) if judged else max(drafted, plain) + 1)
    for _ in range(drafted):
        payoff.add(drafted_s / drafted, 2, out // drafted)
    for _ in range(plain):
        payoff.add(plain_s / plain, 0, 1)
    assert (payoff.pays is not None) == judged
    return payoff


def test_the_record_keeps_new_sequences_off_drafts_that_do_not_pay_but_probes() -> None:
    """Across sequences: no verdict until both kinds of step were seen 2 * judge_after times;
    drafts slower than plain steps keep new sequences off drafts but one in `probe_every`;
    recent probes that measure drafting faster lift it (older sequences weigh less); a
    sequence too short for a verdict of its own is not counted."""
    record = DraftRecord(judge_after=4, probe_every=3)
    assert record.pays is None and record.start_drafting()
    slower = _payoff(drafted=5, plain=5, drafted_s=1.0, plain_s=0.5, out=5)  # 5 vs 10 tok/s
    record.add(slower)
    assert record.pays is None  # 5 steps of each kind: not yet 8
    record.add(slower)
    assert record.pays is False
    assert [record.start_drafting() for _ in range(6)] == [False, False, True] * 2
    short = _payoff(drafted=3, plain=2, drafted_s=0.1, plain_s=1.0, out=9, judged=False)
    before = record.drafted_steps
    record.add(short)
    assert record.drafted_steps == before and record.pays is False
    faster = _payoff(drafted=6, plain=6, drafted_s=0.6, plain_s=1.2, out=18)  # 30 vs 5 tok/s
    record.add(faster)
    assert record.pays is True and record.start_drafting() and record.start_drafting()
    record.add(slower)
    record.add(slower)
    assert record.pays is False and record.asked == 0  # counted afresh: the 3rd asker probes
    assert [record.start_drafting() for _ in range(3)] == [False, False, True]
    assert DraftRecord(judge_after=0).pays is None  # never judged
    with pytest.raises(ConfigError):
        DraftRecord(judge_after=4, probe_every=0)


def test_a_model_whose_drafts_did_not_pay_starts_new_requests_in_the_batch(
    tiny_llama: LoadedModel,
) -> None:
    """The worker's record says drafting does not pay here: a new request decodes in the batch
    from its first token (no drafts, never alone), with plain greedy's tokens; the probe, one
    request in `probe_every`, drafts again, and its finish is recorded."""
    prompt, expected = long_answer(tiny_llama)
    lookup = LookupSettings(probe_every=2, judge_after=2)
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings(lookup=lookup)).start()
    try:
        slower = _payoff(drafted=20, plain=20, drafted_s=4.0, plain_s=1.0, out=20)
        worker.call(lambda: worker.drafts.add(slower))
        assert worker.call(lambda: worker.drafts.pays) is False
        params = SamplingParams(max_tokens=40, stop_loops=False)
        plain = completion(worker.submit(prompt, params))
        assert plain.tokens == expected and plain.stats.drafted_tokens == 0
        assert plain.stats.decode_steps == 0  # never alone: no speculative decoder at all
        probe = completion(worker.submit(prompt, params))
        assert probe.tokens == expected and probe.stats.drafted_tokens > 0
        assert worker.call(lambda: worker.drafts.drafted_steps) > 20 * 0.75  # the probe's too
    finally:
        worker.stop()


class DraftCostClock:
    """A clock under which a step that checked a draft takes 10 s per draft token and a plain
    step 1 s: drafting never pays."""

    def __init__(self) -> None:
        self.now = 0.0
        self.decoder: SpeculativeDecoder | None = None
        self.drafted = 0

    def __call__(self) -> float:
        drafted = self.decoder.stats.drafted if self.decoder else 0
        self.now += 1.0 + 10.0 * (drafted - self.drafted)
        self.drafted = drafted
        return self.now


def long_answer(loaded: LoadedModel) -> tuple[SegmentedPrompt, list[int]]:
    """A repetitive prompt whose plain greedy answer runs to the 40-token limit, and that answer."""
    engine = Engine(loaded)
    try:
        answers = ((p, run(engine, p, "off")) for p in map(repetitive_prompt, range(20)))
        prompt, plain = next((p, a) for p, a in answers if a.stats.finish_reason == "length")
    finally:
        engine.close()
    return prompt, plain.tokens


def test_a_sequence_stops_drafting_when_drafts_measure_slower(tiny_llama: LoadedModel) -> None:
    prompt, expected = long_answer(tiny_llama)
    kv = make_prompt_cache(tiny_llama.model)
    tiny_llama.model(mx.array(prompt.tokens[:-1])[None], cache=kv)
    clock = DraftCostClock()
    settings = LookupSettings(judge_after=2)
    decoder = SpeculativeDecoder(tiny_llama.model, kv, prompt.tokens, settings, clock=clock)
    clock.decoder = decoder
    tokens = [decoder.first(prompt.tokens[-1:])]
    drafting_ended_at = judged_with = None
    while len(tokens) < 40:
        tokens += decoder.step(40 - len(tokens))
        if drafting_ended_at is None and not decoder.drafting:
            drafting_ended_at = decoder.stats.drafted
            judged_with = min(decoder.payoff.drafted_steps, decoder.payoff.plain_steps)
    assert tokens[:40] == expected
    assert drafting_ended_at is not None and decoder.stats.drafted == drafting_ended_at
    assert judged_with == 2  # judged as soon as two steps of each kind were timed


def test_a_request_whose_drafts_do_not_pay_decodes_in_the_batch(
    tiny_llama: LoadedModel, merges: list[int]
) -> None:
    """Drafting must beat plain steps a thousandfold here, so it is judged not to pay after two
    steps of each kind: the request moves into the batch for good (it does not leave it again
    when alone) and still gets plain greedy's tokens."""
    prompt, expected = long_answer(tiny_llama)
    lookup = LookupSettings(judge_after=2, min_gain=1000.0)
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings(lookup=lookup)).start()
    try:
        params = SamplingParams(max_tokens=40, stop_loops=False)
        done = completion(worker.submit(prompt, params))
        assert done.tokens == expected
        assert done.stats.drafted_tokens > 0
        assert merges == [1]
    finally:
        worker.stop()


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per move of a speculating sequence into the batch (ModelWorker._merge_solo)."""
    moves: list[int] = []
    merge = ModelWorker._merge_solo

    def counted(worker: ModelWorker) -> None:
        moves.append(1)
        merge(worker)

    monkeypatch.setattr(ModelWorker, "_merge_solo", counted)
    return moves


# -- exactness on real (tiny) models -----------------------------------------------------------
def repetitive_prompt(seed: int, n: int = 90) -> SegmentedPrompt:
    """Text that repeats phrases, as RAG prompts do (sources quoted, names repeated)."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(5, 300) for _ in range(rng.randrange(3, 7))] for _ in range(6)]
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += rng.choice(phrases)
    return SegmentedPrompt(tokens[:n], [n // 2, n])


def completion(ticket: Ticket) -> Completion:
    """The completion a worker's ticket ends with (its text deltas skipped)."""
    return next(e for e in ticket.events(timeout=60) if isinstance(e, Completion))


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
    # The model copies its own loops, so drafts get accepted; gemma's 24-token window has wrapped
    # on these 90-token prompts, and rejected drafts are cut back out of it (cut_back).
    assert accepted > 0


def test_a_verify_gives_each_position_the_bits_of_its_decode_step(loaded: LoadedModel) -> None:
    """Stronger than equal tokens: a verify's logits are, bit for bit, the logits of decoding
    the same tokens one at a time, and so are the steps after a rejected draft was cut back.
    Gemma's 24-token window has wrapped after the 90-token prompt (its decode steps write a ring,
    its verify steps see the window in temporal order). Needs the decode kernel's attention."""
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    from ragcache import attention

    if not attention.tag().endswith(attention.DECODE_TAG):
        pytest.skip("MLX's attention splits its sums by the context's length")
    net = loaded.model
    prompt = mx.array([repetitive_prompt(1).tokens])
    draft = [11, 12, 13, 14, 15, 16, 17, 18]

    def prefilled() -> list:
        kv = make_prompt_cache(net)
        mx.eval(net(prompt, cache=kv))
        return kv

    kv = prefilled()
    decoded = [np.array(net(mx.array([[t]]), cache=kv)[0, -1]) for t in draft]
    kv = prefilled()
    verified = np.array(net(mx.array([draft]), cache=kv)[0])
    for i in range(len(draft)):
        assert np.array_equal(verified[i].view(np.uint32), decoded[i].view(np.uint32)), i
    cut_back(kv, 5)  # three of the draft kept: the next steps decode from there
    again = [np.array(net(mx.array([[t]]), cache=kv)[0, -1]) for t in draft[3:]]
    for i, row in enumerate(again):
        assert np.array_equal(row.view(np.uint32), decoded[3 + i].view(np.uint32)), i


@pytest.mark.parametrize("prompt_tokens", [90, 12])
def test_a_sliding_window_speculates_before_and_after_it_wraps(
    tiny_gemma: LoadedModel, prompt_tokens: int, merges: list[int]
) -> None:
    """Gemma's 24-token window has wrapped after a 90-token prompt; after a 12-token one it wraps
    during the answer, inside a verify step. Either way the sequence speculates to its end
    alone (it is never moved into the batch) and gives the tokens of plain greedy decoding.
    Drafting is never judged here (judge_after 0): its timing must not decide the test."""
    engine = Engine(tiny_gemma)
    lookup = LookupSettings(judge_after=0)
    worker = ModelWorker(engine, WorkerSettings(lookup=lookup)).start()
    accepted = 0

    def answer(prompt: SegmentedPrompt, mode: str) -> Completion:
        params = SamplingParams(max_tokens=40, stop_loops=False, speculation=mode)  # type: ignore[arg-type]
        return completion(worker.submit(prompt, params))

    try:
        for seed in range(3):
            prompt = repetitive_prompt(seed, prompt_tokens)
            plain = answer(prompt, "off")
            fast = answer(prompt, "lookup")
            assert fast.tokens == plain.tokens and fast.text == plain.text, seed
            assert len(prompt.tokens) + len(fast.tokens) > 24 + 8  # past the window
            assert fast.stats.decode_steps > 0
            rejected = fast.stats.drafted_tokens - fast.stats.accepted_tokens
            accepted += fast.stats.accepted_tokens
            assert rejected > 0  # something was cut back out of the window
    finally:
        worker.stop()
        engine.close()
    assert accepted > 0
    assert merges == []


# -- cutting a sliding window back, against what it must hold ----------------------------------
def _window_ids(cache: RotatingKVCache) -> list[int]:
    """The token ids the next one-token step attends to (besides itself), oldest first: a
    copy of the cache takes a marker token through mlx-lm's own in-place write."""
    probe = copy.deepcopy(cache)
    marker = mx.full((1, 1, 1, 1), -1.0)
    keys, _ = probe.update_and_fetch(marker, marker)
    order = keys[0, 0, :, 0].tolist()
    if probe.offset >= probe.max_size:  # the buffer is rotated: start after the marker's slot
        at = order.index(-1.0)
        order = order[at + 1 :] + order[: at + 1]
    return [int(x) for x in order if x != -1.0]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(3, 12),
    st.lists(st.tuples(st.integers(1, 9), st.integers(0, 8)), min_size=1, max_size=25),
)
def test_cut_back_leaves_a_sliding_window_as_if_the_tokens_were_never_fed(
    window: int, steps: list[tuple[int, int]]
) -> None:
    """Steps of 1-9 tokens (one-token writes in place, longer ones through mlx-lm's concat),
    after each multi-token step some of its tokens cut back off, as a rejected draft is: the
    window always holds exactly the newest tokens that were kept."""
    cache = RotatingKVCache(max_size=window, keep=0)
    kept: list[int] = []
    next_id = 1
    for size, cut in steps:
        ids = list(range(next_id, next_id + size))
        next_id += size
        x = mx.array(ids, dtype=mx.float32).reshape(1, 1, size, 1)
        cache.update_and_fetch(x, x)
        kept += ids
        cut = min(cut, size - 1) if size > 1 else 0  # a verify keeps at least its first token
        cut_back([cache], cut)
        del kept[len(kept) - cut :]
        assert cache.offset == len(kept)
        assert _window_ids(cache) == kept[-(window - 1) :]


def test_a_cut_that_would_leave_a_wrapped_window_short_is_refused() -> None:
    """After the window has wrapped, a concat step cut back into its own first token would leave
    mlx-lm's buffer shorter than the window, which its next one-token write cannot handle: the
    cut is refused before anything changes; one token fewer cut is fine."""
    for cut, refused in [(3, True), (2, False)]:
        cache = RotatingKVCache(max_size=5, keep=0)
        for ids in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12]):
            x = mx.array(ids, dtype=mx.float32).reshape(1, 1, len(ids), 1)
            cache.update_and_fetch(x, x)
        before = cache.offset
        if refused:
            with pytest.raises(CannotCutBack, match="less than the window"):
                cut_back([cache], cut)
            assert cache.offset == before
            assert _window_ids(cache) == [9, 10, 11, 12]
        else:
            cut_back([cache], cut)
            assert _window_ids(cache) == [7, 8, 9, 10]


def test_a_window_taken_out_of_a_batch_cuts_its_last_token_back() -> None:
    """What the worker does when the last request leaves a batch: its wrapped window, extracted
    from mlx-lm's batched cache after one-token steps, is cut back by the token the batch fed
    last; the next one-token step and the next verify step see exactly the newest kept tokens."""

    def wrapped(ids: list[int]) -> RotatingKVCache:
        cache = RotatingKVCache(max_size=5, keep=0)
        x = mx.array(ids, dtype=mx.float32).reshape(1, 1, len(ids), 1)
        cache.update_and_fetch(x, x)
        return cache

    batch = BatchRotatingKVCache.merge([wrapped(list(range(1, 10))), wrapped(list(range(20, 27)))])
    for step in range(3):  # decode steps of the batch, written in place: the window rotates
        t = mx.array([500.0 + step, 600.0 + step]).reshape(2, 1, 1, 1)
        batch.update_and_fetch(t, t)
    kept = [*range(20, 27), 600, 601]  # the second sequence, its last token (602) cut back
    alone = batch.extract(1)
    cut_back([alone], 1)
    assert alone.offset == len(kept)
    assert _window_ids(alone) == kept[-4:]
    verify = mx.array([700.0, 701.0, 702.0]).reshape(1, 1, 3, 1)
    keys, _ = alone.update_and_fetch(verify, verify)
    assert keys[0, 0, :, 0].tolist() == [*kept[-4:], 700.0, 701.0, 702.0]


def test_a_wrapped_one_token_write_is_not_cut_back() -> None:
    """A one-token write into a wrapped window overwrote the oldest token: cutting more than it
    wrote would leave the window short, so it is refused before any layer changes."""
    cache = RotatingKVCache(max_size=4, keep=0)
    x = mx.arange(1, 7, dtype=mx.float32).reshape(1, 1, 6, 1)
    cache.update_and_fetch(x, x)
    one = mx.full((1, 1, 1, 1), 7.0)
    cache.update_and_fetch(one, one)
    plain = KVCache()
    plain.update_and_fetch(x, x)
    with pytest.raises(CannotCutBack, match="sliding-window"):
        cut_back([plain, cache], 2)
    assert plain.offset == 6 and cache.offset == 7


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
        done += [completion(t) for t in tickets]
        assert [d.tokens for d in done] == expected
        assert done[0].stats.decode_steps > 0  # it did speculate before the others joined
    finally:
        worker.stop()


def test_requests_arriving_together_decode_as_one_batch_from_the_start(
    tiny_llama: LoadedModel, merges: list[int]
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
        done = [completion(t) for t in tickets]
        assert [d.tokens for d in done] == expected
        assert merges == []  # nobody speculated alone while the others were still there
        # at most the last one left speculates, once the others have finished
        assert sum(d.stats.decode_steps > 0 for d in done) <= 1
    finally:
        worker.stop()


def test_the_last_request_left_in_a_batch_speculates_the_rest_alone(loaded: LoadedModel) -> None:
    """Two requests decode as one batch; when the short one ends, the other has the model to
    itself and goes on speculatively (gemma: its window has wrapped), with the tokens of plain
    greedy decoding. A new request then batches with it again."""
    prompts = [repetitive_prompt(s) for s in range(3)]
    short = SamplingParams(max_tokens=3, stop_loops=False)
    long = SamplingParams(max_tokens=60, stop_loops=False)
    solo = Engine(loaded)
    expected = [solo.generate(prompts[0], replace(short, speculation="off")).tokens]
    expected += [solo.generate(p, replace(long, speculation="off")).tokens for p in prompts[1:]]
    solo.close()
    worker = ModelWorker(Engine(loaded), WorkerSettings(max_batch=4)).start()
    try:
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:  # both are queued before the worker takes either
            entered.set()
            release.wait(30)

        held = threading.Thread(target=worker.call, args=(hold,))
        held.start()
        assert entered.wait(30)
        first, second = worker.submit(prompts[0], short), worker.submit(prompts[1], long)
        release.set()
        held.join()
        events = second.events(timeout=60)
        done_first = completion(first)
        # the third arrives while the second speculates alone: they batch from then on
        done_second = None
        for i, event in enumerate(events):
            if isinstance(event, Completion):
                done_second = event
                break
            if i == 20:
                break
        third = worker.submit(prompts[2], long)
        done_second = done_second or next(e for e in events if isinstance(e, Completion))
        done_third = completion(third)
        got = [done_first.tokens, done_second.tokens, done_third.tokens]
        assert got == expected
        assert done_first.stats.decode_steps == 0
        assert done_second.stats.decode_steps > 0 and done_second.stats.drafted_tokens > 0
    finally:
        worker.stop()


def test_with_one_slot_a_request_speculates_though_others_wait(tiny_llama: LoadedModel) -> None:
    """With max_batch 1 nothing can ever batch with it: the queue is no reason to decode plainly."""
    worker = ModelWorker(Engine(tiny_llama), WorkerSettings(max_batch=1)).start()
    try:
        params = SamplingParams(max_tokens=20, stop_loops=False)
        tickets = [worker.submit(repetitive_prompt(s), params) for s in range(3)]
        done = [completion(t) for t in tickets]
        assert all(d.stats.decode_steps > 0 for d in done)
    finally:
        worker.stop()
