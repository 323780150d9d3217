"""One small adapter per kind of mlx-lm layer cache: take, split, restore, size.

Two shapes of stored state, chosen by the layer kind, never by special-case fields:
- *span* kinds (`KVCache`): a node keeps a contiguous copy of its span's K/V; any prefix is the
  concatenation of the spans along its path, cut anywhere.
- *snapshot* kinds (`RotatingKVCache`, which cannot be cut back once it wraps; `ArraysCache`, recurrent
  state): a node keeps a copy of the whole layer state at its end (a checkpoint); a prefix can only
  resume where every such layer has one.
Stored arrays are copies (`copy_array`), never views into a live cache buffer, and are evaluated at
once so they hold no reference to the live graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache


def copy_array(x: mx.array) -> mx.array:
    """A fresh buffer: `mx.contiguous` returns its input when already contiguous (a view would keep
    the whole live buffer alive), `mx.array(x)` always copies just the viewed elements."""
    return mx.array(x)


@dataclass(frozen=True)
class Codec:
    """How arrays are stored: as is (bits=None) or quantized with mx.quantize (8 or 4 bits)."""

    bits: int | None = None
    group_size: int = 64

    def encode(self, x: mx.array) -> Any:
        if self.bits is None or x.shape[-1] % self.group_size:
            return copy_array(x)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def decode(self, stored: Any, dtype: mx.Dtype) -> mx.array:
        if isinstance(stored, tuple):
            w, scales, biases = stored
            out = mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits)
            return out.astype(dtype)
        return stored


def n_bytes(data: Any) -> int:
    """Bytes of every array in a nested tuple/list/dict structure (None counts 0)."""
    if data is None:
        return 0
    if isinstance(data, mx.array):
        return data.nbytes
    if isinstance(data, dict):
        return sum(n_bytes(v) for v in data.values())
    if isinstance(data, tuple | list):
        return sum(n_bytes(v) for v in data)
    return 0


def _seq_slice(stored: Any, a: int, b: int | None) -> Any:
    # Quantized triples keep the sequence axis at 2 too, so one slice rule covers both.
    if isinstance(stored, tuple):
        return tuple(copy_array(x[..., a:b, :]) for x in stored)
    return copy_array(stored[..., a:b, :])


class LayerKind(Protocol):
    @property
    def spans(self) -> bool: ...  # True: span kind (restorable anywhere); False: checkpoints only

    def take_span(self, cache: Any, start: int, end: int) -> Any: ...
    def take_snapshot(self, cache: Any) -> Any: ...
    def split(self, span: Any, at: int) -> tuple[Any, Any]: ...
    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> Any: ...


@dataclass(frozen=True)
class KVSpans:
    """`KVCache`: trimmable, so each node stores (K, V) for its own span only."""

    codec: Codec
    spans: bool = True

    def take_span(self, cache: KVCache, start: int, end: int) -> Any:
        k, v = cache.keys[..., start:end, :], cache.values[..., start:end, :]
        return (self.codec.encode(k), self.codec.encode(v), k.dtype)

    def take_snapshot(self, cache: KVCache) -> Any:
        return None

    def split(self, span: Any, at: int) -> tuple[Any, Any]:
        k, v, dtype = span
        return (_seq_slice(k, 0, at), _seq_slice(v, 0, at), dtype), (
            _seq_slice(k, at, None),
            _seq_slice(v, at, None),
            dtype,
        )

    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> KVCache:
        cache = KVCache()
        if not spans:
            return cache
        dtype = spans[0][2]
        keys = [self.codec.decode(s[0], dtype) for s in spans]
        values = [self.codec.decode(s[1], dtype) for s in spans]
        # One span is kept by reference; KVCache reallocates before writing past it, never in place.
        cache.keys = keys[0] if len(keys) == 1 else mx.concatenate(keys, axis=2)
        cache.values = values[0] if len(values) == 1 else mx.concatenate(values, axis=2)
        cache.offset = offset
        return cache


@dataclass(frozen=True)
class RotatingSnapshots:
    """`RotatingKVCache` (sliding window): a checkpoint keeps the last `max_size` tokens in order."""

    codec: Codec
    spans: bool = False

    def take_span(self, cache: RotatingKVCache, start: int, end: int) -> Any:
        return None

    def take_snapshot(self, cache: RotatingKVCache) -> Any:
        keys, values = self._ordered(cache, cache.keys), self._ordered(cache, cache.values)
        meta = (cache.offset, cache.keep, cache.max_size, keys.dtype)
        return (self.codec.encode(keys), self.codec.encode(values), meta)

    @staticmethod
    def _ordered(cache: RotatingKVCache, v: mx.array) -> mx.array:
        # Temporal order of the live buffer (as mlx-lm's _temporal_order), then at most max_size
        # tokens: the `keep` head plus the newest ones, which is all the next token can attend to.
        idx, keep, size = cache._idx, cache.keep, cache.max_size
        if idx < cache.offset and idx != v.shape[2]:
            v = mx.concatenate([v[..., :keep, :], v[..., idx:, :], v[..., keep:idx, :]], axis=2)
        elif idx != v.shape[2]:
            v = v[..., :idx, :]
        if v.shape[2] > size:
            v = mx.concatenate([v[..., :keep, :], v[..., v.shape[2] - size + keep :, :]], axis=2)
        return v

    def split(self, span: Any, at: int) -> tuple[Any, Any]:
        return None, None

    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> RotatingKVCache:
        if snapshot is None:
            raise ValueError("a rotating (sliding-window) layer restores only from a checkpoint")
        k, v, (snap_offset, keep, max_size, dtype) = snapshot
        assert snap_offset == offset, (snap_offset, offset)
        cache = RotatingKVCache(max_size=max_size, keep=keep)
        cache.keys, cache.values = self.codec.decode(k, dtype), self.codec.decode(v, dtype)
        cache.offset = offset
        # _idx at the buffer's end: the next in-place write wraps to `keep`, the next concat trims.
        cache._idx = cache.keys.shape[2]
        return cache


@dataclass(frozen=True)
class ArraysSnapshots:
    """`ArraysCache` (recurrent state): a checkpoint copies every state array, never quantized."""

    spans: bool = False

    def take_span(self, cache: ArraysCache, start: int, end: int) -> Any:
        return None

    def take_snapshot(self, cache: ArraysCache) -> Any:
        return tuple(None if a is None else copy_array(a) for a in cache.cache)

    def split(self, span: Any, at: int) -> tuple[Any, Any]:
        return None, None

    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> ArraysCache:
        if snapshot is None:
            raise ValueError("a recurrent layer restores only from a checkpoint")
        cache = ArraysCache(len(snapshot))
        cache.cache = list(snapshot)
        return cache


def layer_kind(cache: Any, codec: Codec) -> LayerKind | None:
    """The adapter for one mlx-lm cache object; None for kinds the prefix cache does not handle."""
    kind = type(cache)
    if kind is KVCache:
        return KVSpans(codec)
    if kind is RotatingKVCache:
        return RotatingSnapshots(codec)
    if kind is ArraysCache:
        return ArraysSnapshots()
    return None


def evaluate(data: Any) -> None:
    """Compute stored copies now, so they stop referencing the live cache's graph and buffers."""
    arrays: list[mx.array] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, mx.array):
            arrays.append(item)
        elif isinstance(item, tuple | list):
            stack.extend(item)
    if arrays:
        mx.eval(arrays)
