"""The loop guard: periodic tails are loops, text that does not repeat never is."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ragcache.loop_guard import LoopGuard, LoopSettings, find_loop


def test_a_sentence_said_twice_is_a_loop_and_the_copy_is_dropped() -> None:
    sentence = list(range(100, 120))  # 20 tokens
    tokens = [1, 2, 3, *sentence, *sentence]
    found = find_loop(tokens)
    assert found is not None and found.period == 20 and found.repeats == 2
    assert tokens[: found.first_repeat_at] == [1, 2, 3, *sentence]


def test_short_blocks_need_more_repeats() -> None:
    assert find_loop([7, 8] * 7) is None  # 14 tokens: under the minimum span
    assert find_loop([7, 8] * 8) is not None
    assert find_loop([1, 2, 3, 1, 2, 3]) is None


def test_guard_fires_when_the_second_copy_completes() -> None:
    block = list(range(10, 30))
    guard = LoopGuard()
    fired_at = None
    for i, token in enumerate([5, *block, *block, *block]):
        if guard.feed(token):
            fired_at = i
            break
    assert fired_at == len(block) * 2  # index of the last token of the second copy
    assert guard.keep_tokens == 1 + len(block)


@given(st.lists(st.integers(0, 10_000), min_size=0, max_size=300, unique=True))
def test_sequences_without_repeated_tokens_never_loop(tokens: list[int]) -> None:
    guard = LoopGuard()
    assert not any(guard.feed(t) for t in tokens)
    assert guard.keep_tokens == len(tokens)


@given(
    st.lists(st.integers(0, 50), min_size=0, max_size=40),
    st.lists(st.integers(0, 50), min_size=8, max_size=60),
)
def test_a_block_repeated_enough_is_always_found(prefix: list[int], block: list[int]) -> None:
    s = LoopSettings()
    repeats = max(
        2 if len(block) > s.short_period else s.short_repeats, -(-s.min_span_tokens // len(block))
    )
    tokens = prefix + block * repeats
    found = find_loop(tokens, s)
    if len(block) <= s.max_period:
        assert found is not None
        # Keeping tokens up to the first redundant copy leaves text that still ends in the block.
        kept = tokens[: found.first_repeat_at]
        assert kept[-found.period :] == tokens[-found.period :]


def test_a_phrase_coming_back_with_other_words_around_it_is_a_loop() -> None:
    phrase = [40, 41, 42, 43, 44]
    tokens = [1, *phrase, 2, 3, *phrase, 5, 6, 7, *phrase]
    guard = LoopGuard()
    assert [guard.feed(t) for t in tokens][-1]
    assert guard.keep_tokens == 1 + len(phrase) + 2  # up to where the phrase came back
