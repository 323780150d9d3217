"""Bad settings and calls: caching turns off or refuses loudly; generation keeps working."""

from __future__ import annotations

import logging

import pytest

from ragcache.cache import CacheSettings, PrefixCache, capture_positions
from ragcache.engine import Engine
from ragcache.errors import ConfigError
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

GREEDY = SamplingParams(max_tokens=6)
PROMPT = SegmentedPrompt(list(range(10, 70)), [30, 60])


@pytest.mark.parametrize("budget", [0, "below"])
def test_useless_budget_turns_caching_off(
    tiny_gemma: LoadedModel, budget, caplog: pytest.LogCaptureFixture
) -> None:
    smallest = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=1 << 30)).min_node_bytes
    cache_bytes = smallest - 1 if budget == "below" else 0
    with caplog.at_level(logging.WARNING):
        cache = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=cache_bytes))
    assert "prefix cache off" in caplog.text and not cache.stats().enabled
    engine = Engine(tiny_gemma, cache=cache)
    first = engine.generate(PROMPT, GREEDY)
    again = engine.generate(PROMPT, GREEDY)
    assert first.tokens == again.tokens == Engine(tiny_gemma).generate(PROMPT, GREEDY).tokens
    assert again.stats.cached_tokens == 0 and cache.stats().ram_bytes == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"policy": "fifo"},
        {"kv_bits": 3},
        {"kv_group_size": 48},
        {"checkpoint_every_tokens": -1},
        {"disk_bytes": -5},
    ],
)
def test_invalid_settings_raise_config_error(tiny_llama: LoadedModel, bad: dict) -> None:
    with pytest.raises(ConfigError):
        PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 20, **bad))


def test_capture_outside_prompt_raises(tiny_llama: LoadedModel) -> None:
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 30))
    session = cache.begin(PROMPT.tokens, PROMPT.boundaries)
    with pytest.raises(ValueError):
        session.capture(len(PROMPT.tokens) + 1)
    session.abort()
    session.abort()  # idempotent
    assert all(n.pins == 0 for n in cache.tree.nodes())


def test_tiny_prompts_and_mismatched_finish_store_nothing(tiny_llama: LoadedModel) -> None:
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 30))
    one = cache.begin([42], [1])
    assert one.start == 0 and one.capture_positions == []
    one.finish([42, 43])  # the cache covers no tokens: refused, not stored
    assert cache.stats().ram_nodes == 0
    assert cache.begin([], []).start == 0


def test_capture_positions_policy() -> None:
    # Boundaries, plus every 10 tokens counted from each boundary, strictly inside (start, n).
    assert capture_positions(50, 0, [25, 50], 10) == [10, 20, 25, 35, 45]
    assert capture_positions(50, 20, [25, 50], 0) == [25]
    assert capture_positions(50, 0, [25], 10, have={10, 25}) == [20, 35, 45]


def test_invalidate_and_clear(tiny_llama: LoadedModel) -> None:
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 30))
    engine = Engine(tiny_llama, cache=cache)
    engine.generate(PROMPT, GREEDY)
    chunk = PROMPT.tokens[30:40]
    assert cache.invalidate([chunk]) > 0
    out = engine.generate(PROMPT, GREEDY)
    assert out.stats.cached_tokens <= 30  # nothing past the changed chunk survived
    cache.clear()
    assert cache.stats().ram_nodes == 0 and cache.stats().ram_bytes == 0
