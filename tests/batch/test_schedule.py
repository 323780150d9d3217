"""The batch schedule: a permutation in which every group sharing a prefix is contiguous."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragcache.batch.schedule import schedule

# Few distinct segments, so random sequences share prefixes often.
sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), max_size=30)


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def best_adjacent_sharing(seqs: list[list[int]]) -> int:
    # Each trie node (a distinct non-empty prefix) shared by c sequences allows at most c - 1
    # adjacent pairs inside it; no order can share more in total.
    counts: dict[tuple[int, ...], int] = {}
    for s in seqs:
        for d in range(1, len(s) + 1):
            counts[tuple(s[:d])] = counts.get(tuple(s[:d]), 0) + 1
    return sum(c - 1 for c in counts.values())


@given(sequences)
def test_prefix_order_is_a_permutation_with_the_most_sharing(seqs: list[list[int]]) -> None:
    slots = schedule(seqs, "prefix")
    order = [s.index for s in slots]
    assert sorted(order) == list(range(len(seqs)))
    shared = [lcp(seqs[a], seqs[b]) for a, b in zip(order, order[1:], strict=False)]
    assert [s.shared_segments for s in slots[1:]] == shared
    assert sum(shared) == best_adjacent_sharing(seqs)
    fifo = [lcp(a, b) for a, b in zip(seqs, seqs[1:], strict=False)]
    assert sum(shared) >= sum(fifo)


@given(sequences)
def test_every_shared_prefix_is_one_contiguous_run(seqs: list[list[int]]) -> None:
    order = [s.index for s in schedule(seqs, "prefix")]
    prefixes = {tuple(s[:d]) for s in seqs for d in range(1, len(s) + 1)}
    for p in prefixes:
        at = [i for i, idx in enumerate(order) if tuple(seqs[idx][: len(p)]) == p]
        assert at == list(range(at[0], at[-1] + 1))


@given(sequences, st.sampled_from(["prefix", "fifo"]))
def test_leader_is_the_first_of_the_run_sharing_the_prefix(seqs: list[list[int]], how: str) -> None:
    slots = schedule(seqs, how)
    position = {s.index: p for p, s in enumerate(slots)}
    for pos, slot in enumerate(slots):
        if slot.shared_segments == 0:
            assert slot.leader is None
            continue
        p = tuple(seqs[slot.index][: slot.shared_segments])
        lead = position[slot.leader]
        assert lead < pos
        # Everything from the leader to this slot shares p; the slot before the leader does not.
        assert all(tuple(seqs[slots[q].index][: len(p)]) == p for q in range(lead, pos + 1))
        assert lead == 0 or tuple(seqs[slots[lead - 1].index][: len(p)]) != p


def test_fifo_keeps_input_order_and_unknown_order_fails() -> None:
    seqs = [["s", "b"], ["s", "a"], ["s", "b", "x"]]
    assert [s.index for s in schedule(seqs, "fifo")] == [0, 1, 2]
    assert [s.index for s in schedule(seqs, "prefix")] == [0, 2, 1]
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule(seqs, "random")
