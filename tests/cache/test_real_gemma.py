"""The exactness gate on the real Gemma 3 270m (512-token sliding window, wrapped here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel, load_model
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[2] / "datasets" / "python_docs"


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


def test_speculation_past_the_window_gives_plain_greedy_tokens(gemma: LoadedModel) -> None:
    """Prompt-lookup drafts verified after the 512-token window has wrapped: rejected drafts are
    cut back out of the sliding layers (runtime.speculate.cut_back), with and without the prefix
    cache, and the answers are plain greedy decoding's, token for token."""
    text = (DOCS / "tutorial" / "controlflow.rst").read_text()
    words = text.split()
    cache = PrefixCache(gemma, CacheSettings(cache_bytes=1 << 31))
    engines = {"cold": Engine(gemma), "cached": Engine(gemma, cache=cache)}
    drafted = accepted = 0
    for start in (0, 700, 1400):  # three passages, each over 512 tokens, the second one twice
        passage = " ".join(words[start : start + 600])
        tokens = gemma.tokenizer.encode(f"{passage}\n\nRepeat the first paragraph above:\n")
        prompt = SegmentedPrompt(tokens, [len(tokens)])
        assert len(tokens) > 600
        for name, engine in engines.items():
            plain = engine.generate(prompt, SamplingParams(max_tokens=48, speculation="off"))
            fast = engine.generate(prompt, SamplingParams(max_tokens=48, speculation="lookup"))
            assert fast.tokens == plain.tokens, (start, name)
            drafted += fast.stats.drafted_tokens
            accepted += fast.stats.accepted_tokens
    assert accepted > 0 and drafted > accepted  # drafts were taken and some were cut back
