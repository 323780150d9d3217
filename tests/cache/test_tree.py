"""Property tests of the radix tree (pure: payloads here are the token spans themselves)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.cache.tree import RadixTree, contains_span

BYTES_PER_TOKEN = 10
CHECKPOINT = ("ckpt",) * 3  # 30 bytes


class SpanOps:
    """Payload = the span's own tokens, so a restored prefix can be compared with the prompt."""

    def n_bytes(self, payload: Any) -> int:
        return 0 if payload is None else BYTES_PER_TOKEN * len(payload)

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        return payload[:at], payload[at:]


def insert(tree: RadixTree, seq: list[int], checkpoint: bool = False):
    return tree.insert(
        seq, lambda a, b: tuple(seq[a:b]), (lambda: CHECKPOINT) if checkpoint else None
    )


def restored(tree: RadixTree, query: list[int]) -> list[int]:
    """The tokens the matched payloads spell, cut at the match length."""
    match = tree.match(query)
    out = [t for node in match.path for t in node.payload]
    return out[: match.prefix_len]


seqs = st.lists(st.integers(0, 5), min_size=1, max_size=30)  # tiny alphabet: lots of sharing


@given(st.lists(seqs, min_size=1, max_size=12))
def test_match_after_insert(batch: list[list[int]]) -> None:
    tree = RadixTree(SpanOps(), budget_bytes=10**9)
    for seq in batch:
        insert(tree, seq)
    for seq in batch:
        assert tree.match(seq).prefix_len == len(seq)
        assert restored(tree, seq) == seq


@given(seqs, st.integers(0, 29), st.integers(6, 9))
def test_one_token_difference_never_matches_past_it(seq: list[int], at: int, other: int) -> None:
    tree = RadixTree(SpanOps(), budget_bytes=10**9)
    insert(tree, seq)
    at = at % len(seq)
    query = [*seq[:at], other, *seq[at + 1 :]]  # `other` is outside the alphabet: a real change
    assert tree.match(query).prefix_len == at
    assert restored(tree, query) == query[:at]


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "ckpt", "pin", "unpin"]), seqs), min_size=1, max_size=40
)


@settings(max_examples=200)
@given(ops, st.integers(0, 600), st.sampled_from(["lru", "pgdsf"]))
def test_budget_never_exceeded_and_pins_survive(steps, budget: int, policy: str) -> None:
    tree = RadixTree(SpanOps(), budget_bytes=budget, policy=policy)
    pinned: list = []
    for op, seq in steps:
        if op in ("insert", "ckpt"):
            fresh = tree.match(seq).prefix_len == 0  # nothing on its path is protected
            node = insert(tree, seq, checkpoint=op == "ckpt")
            size = BYTES_PER_TOKEN * len(seq) + (30 if op == "ckpt" else 0)
            if size <= budget and not pinned and fresh:
                assert node is not None  # everything else can be evicted: it must be cached
        elif op == "pin":
            node = insert(tree, seq)
            if node is not None:
                tree.pin(node)
                pinned.append((node, seq))
        elif pinned:
            tree.unpin(pinned.pop(0)[0])
        assert tree.ram_bytes <= budget
        assert tree.ram_bytes == sum(n.n_bytes for n in tree.nodes() if n.in_ram)
        for _, kept in pinned:  # pinned paths are whole and byte-identical
            assert restored(tree, kept) == kept
    assert tree.peak_ram_bytes <= budget


def test_too_large_entry_flushes_nothing() -> None:
    tree = RadixTree(SpanOps(), budget_bytes=100)
    assert insert(tree, [1, 2, 3]) is not None
    before = tree.ram_bytes
    assert insert(tree, list(range(20, 40))) is None  # 200 bytes > budget
    assert tree.ram_bytes == before and tree.match([1, 2, 3]).prefix_len == 3
    assert tree.evictions == 0


def test_shared_prefix_outlives_branches_under_pgdsf() -> None:
    tree = RadixTree(SpanOps(), budget_bytes=BYTES_PER_TOKEN * 30, policy="pgdsf")
    shared = list(range(100, 110))
    for branch in range(6):  # each hit on a branch is a hit on the shared prefix too
        seq = shared + [200 + branch] * 5
        insert(tree, seq)
        tree.touch(tree.match(seq).path)
    assert tree.match(shared).prefix_len == len(shared)
    assert tree.evictions > 0


def test_split_keeps_checkpoint_at_the_end() -> None:
    tree = RadixTree(SpanOps(), budget_bytes=10**6)
    node = insert(tree, [1, 2, 3, 4], checkpoint=True)
    mid = insert(tree, [1, 2])
    assert mid is not None and node is not None
    assert not mid.has_checkpoint and node.has_checkpoint and node.start == 2
    assert mid.children[3] is node


@given(st.lists(seqs, min_size=1, max_size=10), st.lists(st.integers(0, 5), min_size=1, max_size=3))
def test_invalidate_drops_every_path_holding_the_span(batch, span) -> None:
    tree = RadixTree(SpanOps(), budget_bytes=10**9)
    for seq in batch:
        insert(tree, seq)
    tree.invalidate([span])
    for seq in batch:
        matched = seq[: tree.match(seq).prefix_len]
        assert not contains_span(matched, span)
    assert tree.ram_bytes == sum(n.n_bytes for n in tree.nodes() if n.in_ram)


def test_contains_span() -> None:
    assert contains_span([1, 2, 3, 4], [2, 3])
    assert not contains_span([1, 2, 3, 4], [3, 2])
    assert not contains_span([256], [1])  # byte-level match must align to whole tokens
    assert contains_span([5], [])
