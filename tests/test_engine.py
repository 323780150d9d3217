"""The generation engine on tiny real models: streaming, limits, stops, cancel, seeds."""

from __future__ import annotations

import threading
from dataclasses import replace

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from ragcache.engine import Completion, Engine, TextDelta
from ragcache.errors import InvalidRequestError, PromptTooLongError
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import encode_segments
from ragcache.settings import GenerationSettings

TEXT = "The cache keeps the keys and values of every prefix it has seen, so a prompt shares."


def _raw_tokens(loaded: LoadedModel, tokens: list[int], n: int, temp: float = 0.0) -> list[int]:
    mx.random.seed(11)
    steps = generate_step(mx.array(tokens), loaded.model, max_tokens=n, sampler=make_sampler(temp))
    return [token for token, _ in steps]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_greedy_tokens_match_raw_mlx_lm_for_any_prefill_step(fixture: str, request) -> None:
    loaded = request.getfixturevalue(fixture)
    prompt = encode_segments(loaded.tokenizer, [TEXT, " and again " + TEXT])
    assert len(prompt) > 40  # longer than the tiny gemma's 24-token window
    # Sampled at temperature 1 with one seed, the tokens vary and depend on every logit, so
    # equality with raw mlx-lm shows the stepped prefill computes the same distribution.
    for temp in (0.0, 1.0):
        expected = _raw_tokens(loaded, prompt.tokens, 12, temp)
        for step in (5, 512):
            engine = Engine(loaded, GenerationSettings(prefill_step_size=step))
            done = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=temp, seed=11))
            assert done.tokens == expected[: len(done.tokens)]
            assert len(done.tokens) == 12 or done.stats.finish_reason == "stop"
    assert len(set(expected)) > 1


def test_stream_deltas_add_up_to_the_completion(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    events = list(Engine(tiny_llama).stream(prompt, SamplingParams(max_tokens=10)))
    assert isinstance(events[-1], Completion)
    deltas = [e for e in events[:-1] if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == events[-1].text
    stats = events[-1].stats
    assert stats.prompt_tokens == len(prompt.tokens)
    assert stats.cached_tokens == 0 and stats.recomputed_tokens == len(prompt.tokens)
    assert stats.generated_tokens == 10 and stats.finish_reason == "length"
    assert stats.ttft_s > 0 and stats.peak_memory_bytes > 0


def test_stop_string_truncates_and_is_never_emitted(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    # The random model repeats itself: the loop guard would end it before any stop string.
    full = engine.generate(prompt, SamplingParams(max_tokens=16, stop_loops=False)).text
    assert len(full) > 6
    stop = full[3:6]
    done = engine.generate(prompt, SamplingParams(max_tokens=16, stop=(stop,), stop_loops=False))
    assert done.stats.finish_reason == "stop"
    assert done.text == full[: full.index(stop)]


def test_cancel_stops_generation(tiny_llama: LoadedModel) -> None:
    cancel = threading.Event()
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    events = []
    for event in Engine(tiny_llama).stream(prompt, SamplingParams(max_tokens=50), cancel):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    done = events[-1]
    assert isinstance(done, Completion)
    assert done.stats.finish_reason == "cancelled"
    assert done.stats.generated_tokens < 50


def test_cancel_before_start_skips_prefill(tiny_llama: LoadedModel) -> None:
    cancel = threading.Event()
    cancel.set()
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    done = Engine(tiny_llama).generate(prompt, SamplingParams(max_tokens=5), cancel)
    assert done.stats.finish_reason == "cancelled" and done.tokens == []


def test_seeded_sampling_is_reproducible(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama)
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = engine.generate(prompt, params).tokens
    assert engine.generate(prompt, params).tokens == first
    others = {tuple(engine.generate(prompt, replace(params, seed=s)).tokens) for s in range(4)}
    assert len(others) > 1


def test_prompt_longer_than_context_is_refused(tiny_llama: LoadedModel) -> None:
    small = replace(tiny_llama, context_length=16)
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    with pytest.raises(PromptTooLongError, match=r"tokens but .* holds 16"):
        Engine(small).generate(prompt)


def test_max_tokens_is_clamped_to_the_context(tiny_llama: LoadedModel) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    small = replace(tiny_llama, context_length=len(prompt.tokens) + 3)
    done = Engine(small).generate(prompt, SamplingParams(max_tokens=100))
    assert done.stats.generated_tokens <= 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0.0),
        SamplingParams(stop=("",)),
    ],
)
def test_bad_sampling_params_are_rejected(tiny_llama: LoadedModel, params: SamplingParams) -> None:
    prompt = encode_segments(tiny_llama.tokenizer, [TEXT])
    with pytest.raises(InvalidRequestError):
        Engine(tiny_llama).generate(prompt, params)
