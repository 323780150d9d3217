"""The prefix cache under the worker's batched decode: caches extracted from mlx-lm's
BatchGenerator go back into the tree, and restores from them stay exact."""

from __future__ import annotations

import random

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Completion, Engine
from ragcache.model_loader import LoadedModel
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt


def result(ticket) -> Completion:
    events = list(ticket.events(timeout=120))
    assert isinstance(events[-1], Completion)
    return events[-1]


@pytest.mark.parametrize("max_tokens", [6, 30])  # 30: decode wraps the 24-token window
def test_batched_rounds_equal_cold_runs(tiny_gemma: LoadedModel, max_tokens: int) -> None:
    rng = random.Random(max_tokens)
    base = [rng.randrange(4, 380) for _ in range(90)]
    prompts = [
        SegmentedPrompt(base[:cut] + [rng.randrange(4, 380) for _ in range(5)], [cut])
        for cut in (70, 40, 85, 55, 62, 30)
    ]
    params = SamplingParams(max_tokens=max_tokens)
    solo = [Engine(tiny_gemma).generate(p, params).tokens for p in prompts]
    cache = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=1 << 30))
    worker = ModelWorker(Engine(tiny_gemma, cache=cache), WorkerSettings(max_batch=3))
    worker.start()
    try:
        for _ in range(2):  # the second round restores what the batched first round stored
            done = [result(t) for t in [worker.submit(p, params) for p in prompts]]
            assert [d.tokens for d in done] == solo
        assert all(d.stats.cached_tokens >= 24 for d in done)
        multi = SegmentedPrompt(prompts[0].tokens + solo[0] + [7, 8, 9], [len(prompts[0].tokens)])
        again = result(worker.submit(multi, params))
        assert again.tokens == Engine(tiny_gemma).generate(multi, params).tokens
    finally:
        worker.stop()
