"""Position-independent chunk KV: a chunk's K/V computed once, placed wherever the chunk stands.

A prefix cache reuses a chunk only behind the same prefix. A RAG prompt that retrieves chunks
A, C, D after an earlier A, B, D shares the system prompt and A; C and D were computed before, just
at another position or after another neighbour. With chunk reuse on (opt-in: the result is close
to, not the same as, computing the prompt), a prompt is *assembled*:

- the exact prefix from the tree, as always;
- for each later chunk that has a chunk entry: its marker (`[3] Title`) and its first
  `recompute_tokens` tokens are computed in this prompt (EPIC's fix: the first tokens of a chunk
  are where attention to the context it lost is concentrated), then the rest of its K/V is
  copied from the entry, keys re-rotated to their new positions;
- everything else (chunks without an entry, the question) is computed.

Chunk entries live in the same radix tree as prefixes, under the same byte budget, eviction and
disk tier, on paths that start with `CHUNK_MARK`, a token id no prompt contains: so no exact
lookup can ever see them, and an assembled prompt is never stored as an exact prefix (the
session stores only what it computed exactly). An entry keeps the chunk's K/V as first computed
in some prompt, keys rotated back to a canonical position (the chunk's first token at position 1,
after the mark), so placing it at position p is one rotation by p - 1.

An assembled prompt is stored too, whole, on a path that starts with `ASSEMBLED_MARK` (its keys
as they were, at their own positions: it is only ever restored where it was): asked again with
chunk reuse on, the same prompt (or one that starts like it) restores it in one copy instead of
assembling it again, so a repeated question costs what it costs on the exact path and gets the
same K/V, hence the same answer.

Re-rotation is exact for rotary embeddings whose angle is linear in the position (plain RoPE,
Llama 3 frequency scaling); models with other position schemes, sliding-window or recurrent
layers, or quantized KV storage fall back to computing (`unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

CHUNK_MARK = -1  # first token of every chunk entry's path: never a real token id
ASSEMBLED_MARK = -2  # first token of every stored assembled prompt's path
# angle = position x frequency: rotations compose (TableRoPE: nn.RoPE from tables, rope_table.py)
_LINEAR_ROPES = ("RoPE", "TableRoPE", "Llama3RoPE")


def chunk_key(body: Sequence[int]) -> list[int]:
    """The tree path of a chunk entry."""
    return [CHUNK_MARK, *body]


def assembled_key(tokens: Sequence[int]) -> list[int]:
    """The tree path of an assembled prompt (its K/V partly copied, so never an exact prefix)."""
    return [ASSEMBLED_MARK, *tokens]


@dataclass(frozen=True)
class CopiedKV:
    """K/V of prompt positions [start, end) taken from a chunk entry: body tokens from
    `offset` on, one (keys, values) per layer, keys at their canonical positions (an
    assembled prompt's at their own, with offset start - 1), and each layer's rotary module to
    move them with."""

    start: int
    end: int
    offset: int
    layers: Sequence[tuple[mx.array, mx.array]]
    ropes: Sequence[Any]

    def append_to(self, prompt_cache: Sequence[Any]) -> None:
        """Append the K/V to every layer's live cache (which must end at `start`)."""
        delta = self.start - (1 + self.offset)  # canonical position of body token j is 1 + j
        pairs = zip(prompt_cache, self.layers, self.ropes, strict=True)
        for cache, (keys, values), rope in pairs:
            cache.update_and_fetch(rerotate(keys, rope, delta), values)


@dataclass(frozen=True)
class Piece:
    """A run of prompt positions [start, end): computed here, or copied from a chunk entry."""

    start: int
    end: int
    chunk: int | None = None  # index into the prompt's chunk spans; None: computed
    offset: int = 0  # where the copied tokens start inside the chunk's body

    @property
    def copied(self) -> bool:
        return self.chunk is not None


def plan_assembly(
    n_tokens: int,
    start: int,
    chunk_spans: Sequence[tuple[int, int]],
    has_entry: Callable[[int], bool],
    recompute_tokens: int,
    min_tokens: int,
) -> list[Piece]:
    """Pieces covering [start, n_tokens - 1) in order; the last token is always computed (its
    logits start the answer). A chunk span (a, b) at or after `start` whose entry exists
    (`has_entry(i)`) is copied from a + recompute_tokens on, when that leaves at least
    `min_tokens` (>= 1) to copy. Pure."""
    pieces: list[Piece] = []
    cursor = start
    limit = n_tokens - 1
    for i, (a, b) in enumerate(chunk_spans):
        copy_from = a + max(0, recompute_tokens)
        b = min(b, limit)
        if a < cursor or b - copy_from < max(1, min_tokens) or not has_entry(i):
            continue
        if copy_from > cursor:
            pieces.append(Piece(cursor, copy_from))
        pieces.append(Piece(copy_from, b, i, copy_from - a))
        cursor = b
    if cursor < limit:
        pieces.append(Piece(cursor, limit))
    return pieces


def rope_modules(model: Any) -> list[Any] | None:
    """Each layer's rotary embedding, or None when some layer's cannot be re-rotated exactly."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is None or type(rope).__name__ not in _LINEAR_ROPES:
            return None
        out.append(rope)
    return out


def rerotate(keys: mx.array, rope: Any, delta: int) -> mx.array:
    """Keys (B, H, L, D) rotated by `delta` positions more (negative: fewer).

    Every token moves by the same delta: seen by the rotary module as L sequences of length one
    at offset `delta`, which is R(delta) applied to each; R(p + delta) = R(delta) R(p) for the
    linear kinds this is used with.
    """
    if delta == 0:
        return keys
    b, h, n, d = keys.shape
    return rope(keys.reshape(b, h, n, 1, d), offset=delta).reshape(b, h, n, d)


__all__ = [
    "ASSEMBLED_MARK",
    "CHUNK_MARK",
    "assembled_key",
    "CopiedKV",
    "Piece",
    "chunk_key",
    "plan_assembly",
    "rerotate",
    "rope_modules",
]
