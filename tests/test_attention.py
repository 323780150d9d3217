"""CPU attention (ragcache.attention): MLX's attention to float32 rounding, through the vectorized
prefill softmax and through the decode kernel's softmax product; the latter gives a position the
same bits in a decode step, a speculative verify and a left-padded batch."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest

from ragcache import attention
from ragcache.model_loader import LoadedModel

pytestmark = pytest.mark.skipif(not attention.available()[0], reason=attention.available()[1])


def _qkv(heads: int, kv_heads: int, L: int, S: int, seed: int, D: int = 16) -> tuple[mx.array, ...]:
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    return (
        mx.random.normal((2, heads, L, D), key=k1),
        mx.random.normal((2, kv_heads, S, D), key=k2) * 3,
        mx.random.normal((2, kv_heads, S, D), key=k3),
    )


def _close(ours: mx.array, theirs: mx.array) -> None:
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=2e-5, atol=2e-6)


@pytest.fixture()
def every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "MIN_SCORES", 0)  # small shapes take the fast path too
    monkeypatch.setattr(attention, "MIN_QUERY_ROWS", 0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize(("L", "S"), [(1, 1), (1, 37), (5, 5), (7, 40), (33, 300)])
def test_matches_mlx_attention_with_each_kind_of_mask(
    every_size: None, heads: int, kv_heads: int, L: int, S: int
) -> None:
    q, k, v = _qkv(heads, kv_heads, L, S, seed=L * 1000 + S)
    positions = mx.arange(S - L, S)[:, None] - mx.arange(S)[None]
    window = (positions >= 0) & (positions < 8)  # a sliding window, as Gemma's layers pass it
    additive = mx.where(window, 0.0, -1e9)
    for mask in [None, "causal", window, additive]:
        ours = attention.attention(q, k, v, None, scale=0.25, mask=mask)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        _close(ours, theirs)


def test_softmax_rows_matches_mlx_and_gives_masked_entries_nothing() -> None:
    x = mx.random.normal((3, 50, 700), key=mx.random.key(5)) * 20
    _close(attention.softmax_rows(x), mx.softmax(x, axis=-1, precise=True))
    lowest = mx.finfo(mx.float32).min
    masked = mx.where(mx.arange(700)[None] < 10, x[0], lowest)
    p = np.array(attention.softmax_rows(masked))
    assert p[:, 10:].max() < 1e-30 and np.allclose(p.sum(axis=-1), 1.0, atol=1e-6)
    half = attention.softmax_rows(x.astype(mx.float16))
    assert half.dtype == mx.float16


def test_a_loaded_model_runs_it_and_its_cache_identity_says_so(tiny_llama: LoadedModel) -> None:
    from ragcache.model_loader import model_identity

    assert attention.routes(tiny_llama.model)
    assert tiny_llama.identity != model_identity(tiny_llama.path, tiny_llama.name)
    assert tiny_llama.identity == model_identity(tiny_llama.path, tiny_llama.name, attention.tag())
    assert attention.TAG in attention.tag()


@pytest.fixture()
def decode_kernel() -> Iterator[float]:
    """The decode kernel's softmax alpha, its path configured as a loaded model's is."""
    from ragcache.blas import skinny_kernel

    kernel = skinny_kernel()
    usable, why = attention.decode_available(kernel)
    if not usable or kernel is None:
        pytest.skip(why)
    attention.configure(True, kernel)
    yield kernel.softmax_alpha


@pytest.mark.parametrize(("heads", "kv_heads", "D"), [(4, 4, 16), (9, 3, 64), (4, 1, 256)])
@pytest.mark.parametrize(("L", "S"), [(1, 1), (1, 37), (1, 1003), (5, 5), (9, 300), (33, 64)])
def test_smaller_calls_take_the_softmax_product_and_match_mlx(
    decode_kernel: float, heads: int, kv_heads: int, D: int, L: int, S: int
) -> None:
    from ragcache.blas import skinny_kernel

    q, k, v = _qkv(heads, kv_heads, L, S, seed=L * 1000 + S, D=D)
    positions = mx.arange(S - L, S)[:, None] - mx.arange(S)[None]
    window = (positions >= 0) & (positions < 8)
    per_sequence = mx.broadcast_to(window, (2, 1, L, S))
    per_head = mx.broadcast_to(window, (2, heads, L, S))
    additive = mx.where(window, 0.0, -1e9)
    counters = skinny_kernel().counters  # type: ignore[union-attr]
    for mask in [None, "causal", window, per_sequence, per_head, additive]:
        before = counters()["softmax_products"]
        ours = attention.attention(q, k, v, None, scale=D**-0.5, mask=mask)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
        _close(ours, theirs)
        assert counters()["softmax_products"] > before


def test_a_position_has_the_same_bits_decoded_verified_or_behind_padding(
    decode_kernel: float,
) -> None:
    """The softmax product sums over the keys in one order and a masked key adds nothing: a
    verify row against the draft's later keys, and a row behind a batch's left padding, have
    the decode step's bits (MLX's attention splits its sums by the context's length)."""
    for heads, kv_heads, D in [(9, 3, 64), (4, 1, 256)]:
        q, k, v = _qkv(heads, kv_heads, 8, 1003, seed=heads, D=D)
        verify = np.array(attention.attention(q, k, v, None, scale=0.125, mask="causal"))
        pad = mx.random.normal((2, kv_heads, 13, D), key=mx.random.key(9))
        k_padded, v_padded = mx.concatenate([pad, k], axis=2), mx.concatenate([pad * 3, v], axis=2)
        visible = mx.arange(1016) >= 13  # a batch row's mask: its padding hidden
        for i in range(8):
            context = 1003 - 8 + i + 1
            one = attention.attention(
                q[:, :, i : i + 1], k[:, :, :context], v[:, :, :context], None, 0.125, None
            )
            padded = attention.attention(
                q[:, :, i : i + 1],
                k_padded[:, :, : 13 + context],
                v_padded[:, :, : 13 + context],
                None,
                0.125,
                visible[: 13 + context][None],
            )
            decoded = np.array(one)[:, :, 0].view(np.uint32)
            assert np.array_equal(verify[:, :, i].view(np.uint32), decoded)
            assert np.array_equal(np.array(padded)[:, :, 0].view(np.uint32), decoded)


def test_without_the_decode_kernel_smaller_calls_keep_mlx_attention_bit_for_bit() -> None:
    attention.configure(True, None)
    try:
        for L in (1, 9, 33, 63):  # a decode step, verifies up to max_draft 32, a short prefill
            q, k, v = _qkv(9, 3, L, 4000, seed=L)  # long context: many scores
            ours = attention.attention(q, k, v, None, scale=0.25, mask=None)
            theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None)
            assert np.array_equal(np.array(ours).view(np.uint32), np.array(theirs).view(np.uint32))
    finally:
        from ragcache.blas import skinny_kernel
        from ragcache.settings import read_blas_settings

        settings = read_blas_settings()
        attention.configure(
            settings.fast_softmax, skinny_kernel() if settings.decode_attention else None
        )


def test_only_the_loaded_model_is_routed(tiny_llama: LoadedModel) -> None:
    """Plain mlx-lm in the same process keeps its own attention."""
    import mlx_lm.models.llama as llama
    from mlx_lm.models.base import scaled_dot_product_attention

    assert llama.scaled_dot_product_attention is scaled_dot_product_attention
    plain = llama.Model(tiny_llama.model.args)
    plain.update(tiny_llama.model.parameters())
    assert not attention.routes(plain)
    vocab = tiny_llama.model.args.vocab_size  # ids past it would read outside the embedding
    x = mx.array([[1, *(5 + i % (vocab - 5) for i in range(599))]])  # 600 tokens: the fast path
    ours, theirs = np.array(tiny_llama.model(x)), np.array(plain(x))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(ours, theirs)  # the routed model did take its own path
    attention.install(plain)
    assert attention.routes(plain)
    assert np.array_equal(np.array(plain(x)), ours)


@pytest.mark.parametrize("batched", [False, True])
def test_a_wrapped_windows_oldest_key_is_found_where_mlx_lm_wrote_it(batched: bool) -> None:
    """The decode path sums a sliding window's keys from its oldest (`_oldest_key`): after
    mlx-lm's own writes (a prompt through its concat path, then one-token steps in place, a
    verify-sized step in between), the keys read from there are the window's positions in
    order."""
    from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache

    window = 8
    cache = BatchRotatingKVCache(window, left_padding=[0]) if batched else RotatingKVCache(window)
    position = 0

    def feed(n: int) -> mx.array:
        nonlocal position
        ids = mx.arange(position, position + n, dtype=mx.float32).reshape(1, 1, n, 1)
        position += n
        keys, _ = cache.update_and_fetch(ids, ids)
        return keys

    feed(5)
    for step in range(30):
        keys = feed(3 if step == 12 else 1)
        if step == 12:
            continue  # a multi-token step: temporal order, its own mask
        stored = [int(x) for x in np.array(keys[0, 0, :, 0])]
        first = attention._oldest_key(cache, 1, len(stored))
        in_order = stored[first:] + stored[:first]
        assert in_order == list(range(position - len(stored), position)), (step, stored, first)
