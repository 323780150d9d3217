"""`replay` (size-only payloads on the real tree) gives the real PrefixCache's hit figures."""

from __future__ import annotations

import random

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.cache.replay import replay
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt


def rag_stream(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(4, 380) for _ in range(10)]
    chunks = [[rng.randrange(4, 380) for _ in range(12)] for _ in range(8)]
    weights = [1 / (r + 1) for r in range(8)]
    out = []
    for _ in range(n):
        picked = sorted({rng.choices(range(8), weights)[0] for _ in range(3)})
        question = [rng.randrange(4, 380) for _ in range(4)]
        out.append(system + [t for i in picked for t in chunks[i]] + question)
    return out


@pytest.mark.parametrize("policy", ["lru", "pgdsf"])
def test_replay_matches_the_real_cache(tiny_gemma: LoadedModel, policy: str) -> None:
    prompts = rag_stream(4, 14)
    probe = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=1 << 30))
    per_token = probe.min_node_bytes
    distinct = replay(prompts, per_token, 1 << 40, window=probe.window).ram_bytes
    budget = distinct // 4
    cache = PrefixCache(
        tiny_gemma, CacheSettings(cache_bytes=budget, policy=policy, store_generated=False)
    )
    engine = Engine(tiny_gemma, cache=cache)
    for p in prompts:
        engine.generate(SegmentedPrompt(p, [len(p)]), SamplingParams(max_tokens=1))
    real = cache.stats()
    sim = replay(prompts, per_token, budget, policy, probe.window)
    assert real.evictions > 0 and real.hits > 0  # the budget really binds
    assert (sim.hit_tokens, sim.prompt_tokens, sim.evictions) == (
        real.hit_tokens,
        real.prompt_tokens,
        real.evictions,
    )
    assert sim.ram_bytes == real.ram_bytes and sim.peak_ram_bytes == real.peak_ram_bytes
