"""The tiny test models load through the real loader and decode non-degenerate greedy tokens."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from ragcache.model_loader import LoadedModel


def _greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    cache = make_prompt_cache(loaded.model)
    steps = generate_step(mx.array(prompt), loaded.model, prompt_cache=cache, max_tokens=n)
    return [token for token, _ in steps]


def test_tiny_llama_is_plain_attention(tiny_llama: LoadedModel) -> None:
    assert all(type(c) is KVCache for c in make_prompt_cache(tiny_llama.model))
    assert tiny_llama.chat and tiny_llama.tokenizer.eos_token_ids


def test_tiny_gemma_window_wraps(tiny_gemma: LoadedModel) -> None:
    kinds = [type(c) for c in make_prompt_cache(tiny_gemma.model)]
    assert RotatingKVCache in kinds and KVCache in kinds
    cache = make_prompt_cache(tiny_gemma.model)
    tiny_gemma.model(mx.array([list(range(4, 64))]), cache=cache)
    rotating = [c for c in cache if isinstance(c, RotatingKVCache)]
    assert all(not c.is_trimmable() for c in rotating)  # wrapped: offset past the window


def test_greedy_tokens_vary_with_prompt(tiny_llama: LoadedModel, tiny_gemma: LoadedModel) -> None:
    for loaded in (tiny_llama, tiny_gemma):
        a = _greedy(loaded, [(i * 7) % 300 + 4 for i in range(40)], 24)
        b = _greedy(loaded, [(i * 11) % 300 + 4 for i in range(40)], 24)
        assert a != b
        assert len(set(a)) > 4 and len(set(b)) > 4
