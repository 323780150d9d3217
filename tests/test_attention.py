"""CPU attention with a vectorized exp (ragcache.attention): MLX's attention to float32 rounding."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ragcache import attention
from ragcache.model_loader import LoadedModel

pytestmark = pytest.mark.skipif(not attention.available()[0], reason=attention.available()[1])


def _qkv(heads: int, kv_heads: int, L: int, S: int, seed: int) -> tuple[mx.array, ...]:
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    return (
        mx.random.normal((2, heads, L, 16), key=k1),
        mx.random.normal((2, kv_heads, S, 16), key=k2) * 3,
        mx.random.normal((2, kv_heads, S, 16), key=k3),
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
    assert tiny_llama.identity == model_identity(tiny_llama.path, tiny_llama.name, attention.TAG)


def test_decode_sized_calls_keep_mlx_attention_bit_for_bit() -> None:
    q, k, v = _qkv(9, 3, 1, 900, seed=1)  # a decode step: 8100 scores
    ours = attention.attention(q, k, v, None, scale=0.25, mask=None)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None)
    assert np.array_equal(np.array(ours).view(np.uint32), np.array(theirs).view(np.uint32))


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


def test_decode_steps_batches_and_verifies_keep_mlx_attention() -> None:
    for L in (1, 9, 33, 63):  # a decode step, verifies up to max_draft 32, a short prefill step
        q, k, v = _qkv(9, 3, L, 4000, seed=L)  # long context: many scores
        ours = attention.attention(q, k, v, None, scale=0.25, mask=None)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None)
        assert np.array_equal(np.array(ours).view(np.uint32), np.array(theirs).view(np.uint32))
