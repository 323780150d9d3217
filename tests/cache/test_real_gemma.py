"""The exactness gate on the real Gemma 3 270m (512-token sliding window, wrapped here)."""

from __future__ import annotations

import random

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel, load_model
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(home) -> LoadedModel:
    return load_model("gemma3-270m", home)


def test_cached_equals_cold_past_the_window(gemma: LoadedModel) -> None:
    rng = random.Random(5)
    base = [rng.randrange(1000, 60000) for _ in range(640)]
    cache = PrefixCache(gemma, CacheSettings(cache_bytes=1 << 31))
    cold, warm = Engine(gemma), Engine(gemma, cache=cache)
    greedy = SamplingParams(max_tokens=8)
    cached = []
    for cut in (600, 560, 630, 300):  # all but the last diverge past the 512-token window
        tokens = base[:cut] + [rng.randrange(1000, 60000) for _ in range(12)]
        prompt = SegmentedPrompt(tokens, [41, 300, cut, len(tokens)])
        got = warm.generate(prompt, greedy)
        assert got.tokens == cold.generate(prompt, greedy).tokens
        cached.append(got.stats.cached_tokens)
    # Sliding layers are spans: each prompt resumes exactly where its match ends.
    assert cached == [0, 560, 600, 300]
    assert cache.stats().checkpoints == 0
