"""Chunk ordering over a real radix tree: permutations, best cached path, the edge guard, speed."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.cache.tree import RadixTree
from ragcache.errors import InvalidRequestError
from ragcache.order import RankedChunk, order_chunks


class _NoPayload:
    """Token structure only: ordering reads the tree's shape, never its KV."""

    def n_bytes(self, payload: Any) -> int:
        return 0

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        return None, None


SYSTEM = [1, 2, 3]


def seg_of(position: int, chunk_id: str) -> list[int]:
    # Marker token for the position, then the chunk's own tokens (stable per chunk id).
    base = 100 + 10 * int(chunk_id[1:])
    return [900 + position, base, base + 1, base + 2]


def prompt_tokens(order: list[str]) -> list[int]:
    out = list(SYSTEM)
    for pos, cid in enumerate(order):
        out += seg_of(pos, cid)
    return out


def tree_with(prompts: list[list[str]]) -> RadixTree:
    tree = RadixTree(_NoPayload(), budget_bytes=1 << 30)
    for p in prompts:
        tree.insert(prompt_tokens(p) + [7, 7], lambda a, b: None)  # + a question
    return tree


def reuse(tree: RadixTree, order: list[str]) -> int:
    return tree.match(prompt_tokens(order)).prefix_len


def chunks(ids: list[str]) -> list[RankedChunk]:
    # Relevance: the order given (first is best).
    return [RankedChunk(c, 1.0 - i / 100) for i, c in enumerate(ids)]


def test_relevance_and_canonical_orders() -> None:
    cs = chunks(["c3", "c1", "c2"])
    assert order_chunks(cs, "relevance").chunk_ids == ["c3", "c1", "c2"]
    assert order_chunks(cs, "canonical").chunk_ids == ["c1", "c2", "c3"]
    with pytest.raises(InvalidRequestError, match="unknown order"):
        order_chunks(cs, "random")


def test_cache_order_follows_the_cached_path_then_canonical_with_top_last() -> None:
    tree = tree_with([["c4", "c2", "c9"]])
    got = order_chunks(chunks(["c7", "c2", "c4", "c5"]), "cache", tree.root, SYSTEM, seg_of)
    assert got.chunk_ids[:2] == ["c4", "c2"]  # the cached path
    assert got.chunk_ids[2:] == ["c5", "c7"]  # canonical tail, top-1 (c7) next to the question
    assert got.cached_chunks == 2
    assert got.cached_tokens == reuse(tree, got.chunk_ids)
    plain = order_chunks(
        chunks(["c7", "c2", "c4", "c5"]), "cache", tree.root, SYSTEM, seg_of, keep_top_at_edge=False
    )
    assert plain.chunk_ids == ["c4", "c2", "c5", "c7"]


def test_nothing_cached_when_the_system_prompt_differs() -> None:
    tree = tree_with([["c1", "c2"]])
    got = order_chunks(chunks(["c2", "c1"]), "cache", tree.root, [9, 9, 9], seg_of)
    assert got.cached_chunks == 0


_ids = st.lists(st.integers(0, 7), min_size=1, max_size=5, unique=True).map(
    lambda xs: [f"c{x}" for x in xs]
)


@settings(max_examples=150, deadline=None)
@given(history=st.lists(_ids, max_size=6), request=_ids)
def test_cache_order_reuses_as_much_as_the_best_permutation(
    history: list[list[str]], request: list[str]
) -> None:
    tree = tree_with(history)
    got = order_chunks(chunks(request), "cache", tree.root, SYSTEM, seg_of)
    assert sorted(got.chunk_ids) == sorted(request)
    oracle = max(reuse(tree, list(p)) for p in itertools.permutations(request))
    assert reuse(tree, got.chunk_ids) == oracle
    assert got.cached_tokens == reuse(tree, got.chunk_ids)
    relevance = order_chunks(chunks(request), "relevance").chunk_ids
    assert reuse(tree, got.chunk_ids) >= reuse(tree, relevance)


@settings(max_examples=50, deadline=None)
@given(request=_ids)
def test_same_chunks_give_the_same_prompt_prefix(request: list[str]) -> None:
    """With nothing cached, any retrieval of the same set orders it the same way (canonical +
    guard), so the next request with that set finds it cached."""
    tree = tree_with([])
    a = order_chunks(chunks(request), "cache", tree.root, SYSTEM, seg_of, keep_top_at_edge=False)
    b = order_chunks(
        chunks(request[::-1]), "cache", tree.root, SYSTEM, seg_of, keep_top_at_edge=False
    )
    assert prompt_tokens(a.chunk_ids) == prompt_tokens(b.chunk_ids)
