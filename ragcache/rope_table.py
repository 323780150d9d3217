"""Rotary position embedding from tables of its cosines and sines, bit for bit MLX's own on CPU.

MLX has no CPU kernel for `mx.fast.rope`: each call runs its fallback, about twenty small ops
(positions, frequencies, `cos`, `sin`, the rotation), 60-90 us each call here whatever the size.
A decode step makes two calls per layer: ~3 ms of a ~40 ms SmolLM2 step, ~2 ms of a Gemma 3 270M
one. Here the cosines and sines of every position are computed once, by MLX's rope itself (a
unit vector rotated at positions 0..n-1 gives exactly its cos and sin bits), and a call slices
the rows it needs and rotates with the fallback's own products and sums in one `mx.compile`d
function: ~15-25 us a call. Decode steps, batches of them and speculative verifies take it;
prefill steps (more than `MAX_ROWS` positions) keep MLX's rope.

The bits are MLX's: the table is the fallback's output, and the rotation is the fallback's
formula, element for element (`install` checks both against `mx.fast.rope` on a probe and
leaves the model alone if any bit differs). So nothing that depends on numerics changes: cached
KV stays valid, and the model's cache identity does not change.

Only `nn.RoPE` itself is routed (mlx-lm's default and linear-scaled rope). Subclasses and other
rope classes (Llama 3, YaRN, su-scaled) keep their own code.
"""

from __future__ import annotations

import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# Calls of at most this many positions take the table: decode steps, batches of them and
# speculative verifies (at most 1 + MAX_DRAFT = 33). Prefill steps keep MLX's rope: the fallback's
# fixed cost is nothing next to a prefill step, and each new length would add an entry to the
# compiled rotation's cache (MLX keeps one per input shape, never evicted).
MAX_ROWS = 64
# Batched decode passes each sequence's offset as an array, read lazily: the table must already
# cover any position it may hold. The engine stops every sequence at the model's context length;
# a speculative verify reaches at most MAX_ROWS - 1 positions past it before being cut back.
MARGIN_POSITIONS = MAX_ROWS
_FIRST_ROWS = 4096  # a table starts this long and doubles when an int offset needs more
_BUILD_ROWS = 4096  # built this many rows at a time: the fallback's temporaries stay small


class RopeTable:
    """cos and sin of one rope configuration (dims, base, scale) at positions 0..rows-1."""

    def __init__(self, dims: int, base: float, scale: float) -> None:
        self.dims, self.base, self.scale = dims, base, scale
        self.rows = 0
        self.cos = self.sin = mx.zeros((0, dims // 2))
        self._growing = threading.Lock()
        # The rows the last call took: a layer's queries and keys, and every layer of a step,
        # ask for the same positions (the same int, or the same offset array of a batch cache).
        self._last: tuple[Any, int, mx.array, mx.array] | None = None

    def cover(self, rows: int) -> None:
        """Make the table hold at least `rows` positions (doubling, so growth is rare). Only
        the new rows are computed: a position's row does not depend on the block it is in."""
        if rows <= self.rows:
            return
        with self._growing:
            if rows <= self.rows:
                return
            n = max(rows, 2 * self.rows, _FIRST_ROWS)
            half = self.dims // 2
            # (1, 0) in each rotated pair: x1*cos - x2*sin is cos, x1*sin + x2*cos is sin, exactly.
            unit = mx.concatenate(
                [mx.ones((1, 1, _BUILD_ROWS, half)), mx.zeros((1, 1, _BUILD_ROWS, half))], axis=-1
            )
            cos_blocks, sin_blocks = [self.cos], [self.sin]
            for start in range(self.rows, n, _BUILD_ROWS):
                rotated = mx.fast.rope(
                    unit,
                    self.dims,
                    traditional=False,
                    base=self.base,
                    scale=self.scale,
                    offset=start,
                )
                cos_blocks.append(mx.contiguous(rotated[0, 0, :, :half]))
                sin_blocks.append(mx.contiguous(rotated[0, 0, :, half:]))
                mx.eval(cos_blocks[-1], sin_blocks[-1])
            cos = mx.concatenate(cos_blocks)[:n]
            sin = mx.concatenate(sin_blocks)[:n]
            mx.eval(cos, sin)
            del cos_blocks, sin_blocks, rotated
            mx.clear_cache()  # the build's temporaries: several times the table, not kept
            self.cos, self.sin = cos, sin
            self.rows = n

    def rows_at(self, offset: int | mx.array, length: int) -> tuple[mx.array, mx.array]:
        """cos and sin at positions offset..offset+length-1, shaped to broadcast over a
        (batch, heads, length, dims/2) half of the input."""
        last = self._last
        if last is not None and last[1] == length:
            same = last[0] is offset or (
                isinstance(offset, int) and isinstance(last[0], int) and last[0] == offset
            )
            if same:
                return last[2], last[3]
        if isinstance(offset, int):
            self.cover(offset + length)
            cos, sin = self.cos[offset : offset + length], self.sin[offset : offset + length]
        else:
            # Rows of left padding have negative positions: clipped, they are masked keys anyway.
            positions = mx.clip(offset.reshape(-1, 1) + mx.arange(length), 0, self.rows - 1)
            cos, sin = self.cos[positions], self.sin[positions]  # (batch or 1, length, dims/2)
            if offset.size > 1:
                cos, sin = mx.expand_dims(cos, 1), mx.expand_dims(sin, 1)  # over the heads
        self._last = (offset, length, cos, sin)
        return cos, sin


def _rotate(x: mx.array, cos: mx.array, sin: mx.array, dims: int, traditional: bool) -> mx.array:
    """The fallback's rotation of `x`'s first `dims` features (the rest pass through)."""
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
    else:
        x1, x2 = x[..., : dims // 2], x[..., dims // 2 : dims]
    first = x1 * cos - x2 * sin
    second = x1 * sin + x2 * cos
    if traditional:
        out = mx.concatenate([first[..., None], second[..., None]], axis=-1)
        out = out.reshape(*x.shape[:-1], dims)
    else:
        out = mx.concatenate([first, second], axis=-1)
    if dims < x.shape[-1]:
        out = mx.concatenate([out, x[..., dims:]], axis=-1)
    return out


_rotate_compiled = mx.compile(_rotate)


def rope(x: mx.array, offset: int | mx.array, table: RopeTable, traditional: bool) -> mx.array:
    """`mx.fast.rope(x, table.dims, ...)` at `offset` (an int, or one per sequence of a batch)."""
    cos, sin = table.rows_at(offset, x.shape[-2])
    return _rotate_compiled(x, cos, sin, table.dims, traditional)


class TableRoPE(nn.RoPE):
    """`nn.RoPE` whose calls go through `rope` (the class `install` gives nn.RoPE modules)."""

    _table: RopeTable

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # What the table and the check cover: not prefill steps (MAX_ROWS), and not a negative
        # int offset (chunk reuse re-rotating keys back), which is no row of the table.
        if (
            x.ndim != 4
            or x.dtype != mx.float32
            or x.shape[-2] > MAX_ROWS
            or (isinstance(offset, int) and offset < 0)
        ):
            return mx.fast.rope(
                x,
                self.dims,
                traditional=self.traditional,
                base=self.base,
                scale=self.scale,
                offset=offset,
            )
        return rope(x, offset, self._table, self.traditional)


def install(model: Any, context_length: int) -> int:
    """Route `model`'s `nn.RoPE` modules through tables covering its context; how many were.

    CPU only (elsewhere MLX's rope is a real kernel). Each configuration is checked against
    `mx.fast.rope` on a probe first, and left alone if any bit differs."""
    if mx.default_device().type != mx.cpu:
        return 0
    tables: dict[tuple[int, float, float, bool], RopeTable | None] = {}
    routed = 0
    for module in model.modules():
        if type(module) is not nn.RoPE:
            continue
        key = (module.dims, float(module.base), float(module.scale), bool(module.traditional))
        if key not in tables:
            table = RopeTable(module.dims, module.base, module.scale)
            table.cover(context_length + MARGIN_POSITIONS)
            tables[key] = table if same_bits(table, module.traditional) else None
        checked = tables[key]
        if checked is not None:
            module.__class__ = TableRoPE
            module._table = checked
            routed += 1
    return routed


def same_bits(table: RopeTable, traditional: bool) -> bool:
    """Whether `rope` gives `mx.fast.rope`'s bits on random probes (int and array offsets,
    one and several rows, a rope over part of the head)."""
    key = mx.random.key(7)
    for heads, length, extra, at in ((2, 1, 0, 5), (3, 7, 0, 4093), (1, 3, 8, 1000)):
        x = mx.random.normal((2, heads, length, table.dims + extra), key=key)
        for offset in (at, mx.array([at, at + 11])):
            want = mx.fast.rope(
                x,
                table.dims,
                traditional=traditional,
                base=table.base,
                scale=table.scale,
                offset=offset,
            )
            got = rope(x, offset, table, traditional)
            if not mx.array_equal(want.view(mx.uint32), got.view(mx.uint32)).item():
                return False
    return True
