"""Layer adapters: round trips through snapshot/restore and spans, and copies that own their memory."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from ragcache.cache.layers import (
    ArraysSnapshots,
    Codec,
    KVSpans,
    RotatingSnapshots,
    RotatingSpans,
    SpanMissing,
    evaluate,
)


def kv(n: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    key = mx.random.key(seed)
    return mx.random.normal((1, 2, n, 64), key=key), mx.random.normal((1, 2, n, 64), key=key + 1)


def test_kv_spans_concatenate_to_the_prefix() -> None:
    live = KVCache()
    k, v = kv(40)
    live.update_and_fetch(k, v)
    kind = KVSpans(Codec())
    spans = [kind.take_span(live, a, b) for a, b in [(0, 10), (10, 33)]]
    restored = kind.restore(spans, None, 33)
    assert restored.offset == 33
    assert mx.array_equal(restored.keys, k[..., :33, :]).item()
    upper, lower = kind.split(spans[1], 5)
    assert upper[0].shape[2] == 5 and lower[0].shape[2] == 18


@pytest.mark.parametrize("total,chunk", [(10, 10), (50, 50), (50, 7), (70, 1)])
def test_rotating_snapshot_continues_like_the_original(total: int, chunk: int) -> None:
    """Restore a (possibly wrapped) window, feed more tokens both ways: same keys seen."""
    original = RotatingKVCache(max_size=16)
    k, v = kv(total + 9, seed=3)
    for a in range(0, total, chunk):
        original.update_and_fetch(
            k[..., a : min(a + chunk, total), :], v[..., a : min(a + chunk, total), :]
        )
    kind = RotatingSnapshots(Codec())
    snap = kind.take_snapshot(original)
    evaluate(snap)
    copy = kind.restore([], snap, total)
    for step in ([total, total + 5], [total + 5, total + 6]):  # a concat step, then an in-place one
        a, b = step
        got_o = original.update_and_fetch(k[..., a:b, :], v[..., a:b, :])[0]
        got_c = copy.update_and_fetch(k[..., a:b, :], v[..., a:b, :])[0]
        window = min(16, b)  # what the last token may attend to, in temporal order
        assert mx.array_equal(
            original._temporal_order(got_o)[..., -window:, :],
            copy._temporal_order(got_c)[..., -window:, :],
        ).item()


def feed(cache: RotatingKVCache, k: mx.array, v: mx.array, a: int, b: int) -> mx.array:
    return cache.update_and_fetch(k[..., a:b, :], v[..., a:b, :])[0]


@pytest.mark.parametrize("chunk", [16, 5, 1])
@pytest.mark.parametrize("resume", [3, 16, 21, 40, 57])
def test_rotating_spans_restore_anywhere_like_the_original(chunk: int, resume: int) -> None:
    """Spans captured at most a window apart restore a window at any position; feeding more
    tokens to the restored cache and to one that saw the prefix live gives the same keys."""
    window, total = 16, 60
    kind = RotatingSpans(Codec(), window)
    k, v = kv(total + 9, seed=5)
    live, spans, stored = RotatingKVCache(max_size=window), [], 0
    for a in range(0, total, chunk):
        feed(live, k, v, a, min(a + chunk, total))
        if live.offset - stored >= window - chunk or live.offset == total:
            spans.append(kind.take_span(live, stored, live.offset))
            stored = live.offset
    evaluate(spans)
    flat_k = mx.concatenate([s[0] for s in spans], axis=2)
    assert mx.array_equal(flat_k, k[..., :total, :]).item()  # every token stored, in order
    # Spans up to `resume` (the last one cut), as the tree hands them over.
    cut, before = [], 0
    for s in spans:
        n = s[0].shape[2]
        if before + n >= resume:
            cut.append(kind.split(s, resume - before)[0] if before + n > resume else s)
            break
        cut.append(s)
        before += n
    restored = kind.restore(cut, None, resume)
    reference = RotatingKVCache(max_size=window)
    for a in range(0, resume, chunk):
        feed(reference, k, v, a, min(a + chunk, resume))
    assert restored.offset == resume == reference.offset
    for a, b in ([resume, resume + 4], [resume + 4, resume + 5], [resume + 5, resume + 6]):
        got_r, got_c = feed(reference, k, v, a, b), feed(restored, k, v, a, b)
        held = min(window + (b - a) - 1 if b - a > 1 else window, b)  # what the step attends to
        assert mx.array_equal(
            reference._temporal_order(got_r)[..., -held:, :],
            restored._temporal_order(got_c)[..., -held:, :],
        ).item()


def test_rotating_spans_refuse_overwritten_tokens() -> None:
    live = RotatingKVCache(max_size=8)
    k, v = kv(30)
    for a in range(0, 30):  # one token at a time: the buffer keeps exactly the last 8
        feed(live, k, v, a, a + 1)
    kind = RotatingSpans(Codec(), 8)
    span = kind.take_span(live, 22, 30)
    assert mx.array_equal(span[0], k[..., 22:30, :]).item()
    with pytest.raises(SpanMissing):
        kind.take_span(live, 21, 30)


def test_snapshot_is_a_copy_not_a_view() -> None:
    live = RotatingKVCache(max_size=4096)
    k, v = kv(4000)
    live.update_and_fetch(k, v)
    mx.eval(live.keys)
    snap = RotatingSnapshots(Codec()).take_snapshot(live)
    evaluate(snap)
    before = mx.get_active_memory()
    del live, k, v
    freed = before - mx.get_active_memory()
    assert freed >= 2 * 4000 * 2 * 64 * 4 * 0.9  # the live buffers really went away


def test_arrays_cache_snapshot_round_trip() -> None:
    live = ArraysCache(2)
    live[0], live[1] = mx.ones((1, 3, 4)), mx.zeros((1, 8))
    kind = ArraysSnapshots()
    snap = kind.take_snapshot(live)
    live[0] = live[0] * 5  # the model moves on
    restored = kind.restore([], snap, 0)
    assert mx.array_equal(restored[0], mx.ones((1, 3, 4))).item()


def test_quantized_codec_round_trip_is_close() -> None:
    x = mx.random.normal((1, 2, 32, 64))
    for bits, tol in [(8, 0.05), (4, 0.5)]:
        codec = Codec(bits)
        stored = codec.encode(x)
        assert isinstance(stored, tuple)
        assert mx.abs(codec.decode(stored, x.dtype) - x).max().item() < tol
