"""Order retrieved chunks so the prompt reuses the longest prefix already in the KV cache.

Pure: a function of (chunks, a read-only view of the cache tree). The view is anything with the
radix tree's node shape (`tokens`, `children` keyed by first token), so this module imports
neither MLX nor the cache. Orders:
- `cache`: walk down from the system prompt, each step taking the chunk that continues the
  longest cached path; then the uncached chunks in canonical order, so later requests that
  retrieve the same set share them too;
- `relevance`: best score first, as a naive RAG app does;
- `canonical`: by stable key (chunk id) only.
A quality guard keeps the most relevant chunk at an edge of the context (right before the
question) whenever it is not part of the reused prefix: answers buried mid-context are the ones
models miss ("lost in the middle").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ragcache.errors import InvalidRequestError

ORDERS = ("cache", "relevance", "canonical")


class TreeNodeView(Protocol):
    tokens: Sequence[int]
    children: Mapping[int, TreeNodeView]


@dataclass(frozen=True)
class RankedChunk:
    chunk_id: str
    score: float  # higher is more relevant


@dataclass(frozen=True)
class Ordering:
    chunk_ids: list[str]
    cached_chunks: int  # leading chunks whose segment continues the cached path in full
    cached_tokens: int  # tokens of system + those chunks found in the tree (a prediction)


# (position in the prompt, chunk id) -> the segment's token ids at that position.
SegmentTokens = Callable[[int, str], Sequence[int]]


@dataclass
class _Cursor:
    node: TreeNodeView
    offset: int  # tokens of `node` already matched; len(node.tokens) at a node end


def _advance(cursor: _Cursor, tokens: Sequence[int]) -> tuple[_Cursor, int]:
    """Follow `tokens` down from `cursor`; return where the walk ended and how far it got."""
    node, offset, i = cursor.node, cursor.offset, 0
    while i < len(tokens):
        if offset == len(node.tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            node, offset = child, 0
        span = node.tokens[offset : offset + len(tokens) - i]
        n = 0
        limit = len(span)
        while n < limit and span[n] == tokens[i + n]:
            n += 1
        i += n
        offset += n
        if n < limit:
            break
    return _Cursor(node, offset), i


def order_chunks(
    chunks: Sequence[RankedChunk],
    order: str,
    root: TreeNodeView | None = None,
    system_tokens: Sequence[int] = (),
    segment_tokens: SegmentTokens | None = None,
    keep_top_at_edge: bool = True,
    max_steps: int = 4096,
) -> Ordering:
    """Return the chunk order for the prompt `[system][chunks...][question]`.

    `root` is the cache tree's root (None: nothing cached). `segment_tokens(position, chunk_id)`
    gives each chunk's tokens as they would stand at that position (markers included). Raises
    InvalidRequestError for an unknown order name. The cached part is the best possible for
    these chunks and this tree (an exhaustive search over cached paths, bounded by `max_steps`).
    """
    if order not in ORDERS:
        raise InvalidRequestError(
            f"unknown order {order!r}", hint="choose one of: " + ", ".join(ORDERS)
        )
    by_relevance = sorted(chunks, key=lambda c: (-c.score, c.chunk_id))
    canonical = sorted(chunks, key=lambda c: c.chunk_id)
    if order == "relevance":
        return Ordering([c.chunk_id for c in by_relevance], 0, 0)
    if order == "canonical" or root is None or segment_tokens is None:
        tail = _guard(canonical, by_relevance[:1], keep_top_at_edge and order == "cache")
        return Ordering([c.chunk_id for c in tail], 0, 0)

    cursor, matched = _advance(_Cursor(root, 0), system_tokens)
    chosen: list[RankedChunk] = []
    partial: list[RankedChunk] = []
    extra = 0
    if matched == len(system_tokens):
        search = _PathSearch(segment_tokens, max_steps)
        extra, chosen, partial = search.best(cursor, canonical, 0)
    rest = partial + [c for c in canonical if c not in chosen and c not in partial]
    top_is_cached = bool(by_relevance) and by_relevance[0] in chosen + partial
    tail = _guard(rest, by_relevance[:1], keep_top_at_edge and not top_is_cached)
    return Ordering([c.chunk_id for c in chosen + tail], len(chosen), matched + extra)


class _PathSearch:
    """Depth-first search for the chunk sequence that follows the longest cached path.

    Only chunks whose whole segment continues the path branch further, and the tree holds only
    sequences seen before, so the search touches few nodes; `max_steps` bounds the worst case,
    after which each level keeps its first (canonical) full match.
    """

    def __init__(self, segment_tokens: SegmentTokens, max_steps: int) -> None:
        self.segment_tokens = segment_tokens
        self.steps_left = max_steps

    def best(
        self, cursor: _Cursor, remaining: list[RankedChunk], position: int
    ) -> tuple[int, list[RankedChunk], list[RankedChunk]]:
        """(tokens matched past `cursor`, full chunks in order, [a chunk matched in part])."""
        best: tuple[int, list[RankedChunk], list[RankedChunk]] = (0, [], [])
        for chunk in remaining:
            seg = self.segment_tokens(position, chunk.chunk_id)
            after, n = _advance(cursor, seg)
            self.steps_left -= 1
            if n == 0:
                continue
            if n < len(seg):
                candidate: tuple[int, list[RankedChunk], list[RankedChunk]] = (n, [], [chunk])
            elif self.steps_left > 0:
                rest = [c for c in remaining if c is not chunk]
                deeper, path, part = self.best(after, rest, position + 1)
                candidate = (n + deeper, [chunk, *path], part)
            else:
                candidate = (n, [chunk], [])
            if candidate[0] > best[0]:  # ties keep the earlier, canonical, choice
                best = candidate
        return best


def _guard(tail: list[RankedChunk], top: list[RankedChunk], enabled: bool) -> list[RankedChunk]:
    """Move the most relevant chunk to the end of `tail`, right before the question."""
    if not enabled or not top or top[0] not in tail:
        return list(tail)
    return [c for c in tail if c != top[0]] + [top[0]]
