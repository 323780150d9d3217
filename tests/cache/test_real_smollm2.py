"""The exactness gate on the real SmolLM2-135M, whose layer weights decode from exact 4-bit codes
(ragcache.q4_weights): cold, cached, speculative and batched greedy answers are those of the same
model read from float copies, token for token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ragcache import output_screen
from ragcache.blas import skinny_kernel
from ragcache.cache import CacheSettings, PrefixCache
from ragcache.engine import Completion, Engine
from ragcache.model_loader import LoadedModel, load_model
from ragcache.packed_weights import pack_model
from ragcache.runtime import ModelWorker, WorkerSettings
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.settings import read_blas_settings

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[2] / "datasets" / "python_docs"


@pytest.fixture(scope="module")
def smollm2(home) -> Iterator[LoadedModel]:
    yield load_model("smollm2-135m-instruct", home)


def prompts(model: LoadedModel) -> list[SegmentedPrompt]:
    """Passages of the docs with a request to repeat them: answers that copy their prompt, so
    speculation drafts and accepts."""
    text = (DOCS / "tutorial" / "controlflow.rst").read_text().split()
    out = []
    for start in (0, 400, 800):
        passage = " ".join(text[start : start + 250])
        tokens = model.tokenizer.encode(f"{passage}\n\nRepeat the first sentence above:\n")
        out.append(SegmentedPrompt(tokens, [len(tokens)]))
    return out


def generate(engine: Engine, batch: list[SegmentedPrompt], mode: str) -> list[Completion]:
    params = SamplingParams(max_tokens=40, stop_loops=False, speculation=mode)
    return [engine.generate(p, params) for p in batch]


def answers(engine: Engine, batch: list[SegmentedPrompt], mode: str) -> list[list[int]]:
    return [list(done.tokens) for done in generate(engine, batch, mode)]


def test_greedy_answers_from_4_bit_codes_are_the_float_copies(smollm2: LoadedModel) -> None:
    kernel = skinny_kernel()
    blas = read_blas_settings()
    if kernel is None or smollm2.packed is None or not blas.q4_weights:
        pytest.skip("the decode kernel, its packed copies or the 4-bit codes are off here")
    layers = 7 * len(smollm2.model.model.layers)
    assert smollm2.packed.q4_matrices == layers  # every layer weight
    batch = prompts(smollm2)

    def repack(q4: bool) -> None:
        assert pack_model(smollm2.model, kernel, q4=q4).q4_matrices == (layers if q4 else 0)
        if blas.output_screen:  # packing again drops the output layer's screen
            output_screen.install(smollm2.model, kernel)

    repack(q4=False)  # the reference: every weight read from its float copy
    try:
        expected = answers(Engine(smollm2), batch, "off")
    finally:
        repack(q4=True)

    packed = kernel.counters()["packed"]
    assert answers(Engine(smollm2), batch, "off") == expected
    assert kernel.counters()["packed"] > packed
    cached = Engine(smollm2, cache=PrefixCache(smollm2, CacheSettings(cache_bytes=1 << 30)))
    assert answers(cached, batch, "off") == expected
    speculated = generate(cached, batch, "lookup")  # from the cache, speculating
    assert [list(d.tokens) for d in speculated] == expected
    assert sum(d.stats.accepted_tokens for d in speculated) > 0  # drafts were verified
    worker = ModelWorker(Engine(smollm2), WorkerSettings(max_batch=4)).start()
    try:
        params = SamplingParams(max_tokens=40, stop_loops=False)
        tickets = [worker.submit(p, params) for p in batch]
        done = [
            next(e for e in t.events(timeout=120) if isinstance(e, Completion)) for t in tickets
        ]
    finally:
        worker.stop()
    assert [list(d.tokens) for d in done] == expected
