"""One small adapter per kind of mlx-lm layer cache: take, split, restore, size.

Two shapes of stored state, chosen by the layer kind, never by special-case fields:
- *span* kinds: a node keeps a contiguous copy of its span's K/V; any prefix is restored from the
  spans along its path, cut anywhere. `KVCache` (global attention) concatenates them all;
  `RotatingKVCache` with keep=0 (sliding window, as in Gemma 3) takes the last `window` tokens
  only. A sliding layer's live buffer holds just the last `window` (or more) tokens, so its span
  must be taken before the buffer overwrites it: `window` bounds the distance between captures,
  and `take_span` raises `SpanMissing` for tokens already overwritten.
- *snapshot* kinds (`ArraysCache`, recurrent state; `RotatingKVCache` with keep>0): a node keeps a
  copy of the whole layer state at its end (a checkpoint); a prefix can only resume where every
  such layer has one.
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


def _split_span(span: Any, at: int) -> tuple[Any, Any]:
    k, v, dtype = span
    upper = (_seq_slice(k, 0, at), _seq_slice(v, 0, at), dtype)
    return upper, (_seq_slice(k, at, None), _seq_slice(v, at, None), dtype)


class SpanMissing(LookupError):
    """The live cache no longer holds the K/V of the requested tokens (a window overwrote them)."""


class LayerKind(Protocol):
    @property
    def spans(self) -> bool: ...  # True: span kind (restorable anywhere); False: checkpoints only
    @property
    def window(self) -> int | None: ...  # span kinds that keep only the last N tokens live: N

    def take_span(self, cache: Any, start: int, end: int) -> Any: ...
    def take_snapshot(self, cache: Any) -> Any: ...
    def split(self, span: Any, at: int) -> tuple[Any, Any]: ...
    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> Any: ...


@dataclass(frozen=True)
class KVSpans:
    """`KVCache`: trimmable, so each node stores (K, V) for its own span only."""

    codec: Codec
    spans: bool = True
    window: int | None = None

    def take_span(self, cache: KVCache, start: int, end: int) -> Any:
        k, v = cache.keys[..., start:end, :], cache.values[..., start:end, :]
        return (self.codec.encode(k), self.codec.encode(v), k.dtype)

    def take_snapshot(self, cache: KVCache) -> Any:
        return None

    def split(self, span: Any, at: int) -> tuple[Any, Any]:
        return _split_span(span, at)

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


def _span_len(span: Any) -> int:
    k = span[0]
    return (k[0] if isinstance(k, tuple) else k).shape[2]


@dataclass(frozen=True)
class RotatingSpans:
    """`RotatingKVCache` with keep=0: spans like `KVSpans`, restored from the last `window` tokens.

    The restored cache holds min(offset, window) tokens in temporal order with `_idx` at the
    buffer's end, exactly what mlx-lm's own `_temporal_order` produces: the next in-place write
    wraps to slot 0 (the oldest token), the next concat drops the oldest before appending.
    """

    codec: Codec
    window: int
    spans: bool = True

    def take_span(self, cache: RotatingKVCache, start: int, end: int) -> Any:
        k, v = self._ordered(cache, cache.keys), self._ordered(cache, cache.values)
        first = cache.offset - k.shape[2]  # position of the oldest token still held
        if start < first or end > cache.offset:
            raise SpanMissing(
                f"tokens {start}..{end} not in the live window {first}..{cache.offset}"
            )
        a, b = start - first, end - first
        return (self.codec.encode(k[..., a:b, :]), self.codec.encode(v[..., a:b, :]), k.dtype)

    @staticmethod
    def _ordered(cache: RotatingKVCache, v: mx.array) -> mx.array:
        # mlx-lm's _temporal_order for keep=0: every held token, oldest first.
        idx = cache._idx
        if idx == v.shape[2]:
            return v
        if idx < cache.offset:
            return mx.concatenate([v[..., idx:, :], v[..., :idx, :]], axis=2)
        return v[..., :idx, :]

    def take_snapshot(self, cache: RotatingKVCache) -> Any:
        return None

    def split(self, span: Any, at: int) -> tuple[Any, Any]:
        return _split_span(span, at)

    def restore(self, spans: Sequence[Any], snapshot: Any, offset: int) -> RotatingKVCache:
        cache = RotatingKVCache(max_size=self.window, keep=0)
        need = min(offset, self.window)
        if need == 0:
            return cache
        tail: list[Any] = []
        have = 0
        for span in reversed(spans):  # only the spans the window reaches back into
            tail.append(span)
            have += _span_len(span)
            if have >= need:
                break
        if have < need:
            raise ValueError(f"spans hold {have} tokens, the window at {offset} needs {need}")
        tail.reverse()
        dtype = tail[0][2]
        out = []
        for part in (0, 1):
            arrays = [self.codec.decode(s[part], dtype) for s in tail]
            x = arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=2)
            out.append(copy_array(x[..., x.shape[2] - need :, :]))  # owned: the cache writes in it
        cache.keys, cache.values = out
        cache.offset, cache._idx = offset, need
        return cache


@dataclass(frozen=True)
class RotatingSnapshots:
    """`RotatingKVCache` with keep>0: a checkpoint keeps the `keep` head and the newest tokens."""

    codec: Codec
    spans: bool = False
    window: int | None = None

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
    window: int | None = None

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
        return RotatingSpans(codec, cache.max_size) if cache.keep == 0 else RotatingSnapshots(codec)
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
