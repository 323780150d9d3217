"""Greedy steps' screened output products (ragcache.output_screen, native/output_screen.c): the
exact logits of the words that can be the argmax, -inf for the rest, and the same greedy token
as the full product, or the full product itself where that is not proven."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from ragcache.blas import cpu_flags
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel
from ragcache.output_screen import greedy_steps, routes, suspended
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.skinny_gemm import cpu_supports_kernel

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and cpu_supports_kernel(cpu_flags())),
    reason="the kernel is for x86-64 Linux with AVX2 and FMA",
)


class Screened:
    """A packed and screened weight, unpacked when the test ends."""

    def __init__(self, kernel, weight: np.ndarray) -> None:
        self.kernel, self.w = kernel, mx.array(weight)
        mx.eval(self.w)
        self.address = np.array(self.w, copy=False).ctypes.data
        n, k = weight.shape
        assert kernel.pack(self.address, n, k)
        self.screened = kernel.screen(self.address, n, k)

    def products(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(full, screened) logits of one row."""
        x = mx.array(row.astype(np.float32)[None, None])
        full = x @ self.w.T
        alpha = self.kernel.screen_alpha
        screened = mx.addmm(mx.array(0.0), x, self.w.T, alpha=alpha, beta=0.0)
        mx.eval(full, screened)
        return np.array(full).ravel(), np.array(screened).ravel()

    def close(self) -> None:
        mx.synchronize()
        self.kernel.unpack(self.address)


def greedy_pick(logits: np.ndarray) -> int:
    """mlx-lm's greedy rule: the argmax of the log-probabilities."""
    x = mx.array(logits)
    return int(mx.argmax(x - mx.logsumexp(x)).item())


def test_a_screened_product_keeps_the_argmax_and_the_bits_of_what_it_computes(kernel) -> None:
    rng = np.random.default_rng(0)
    n, k = 4104, 96  # a partial last block of 16 words
    s = Screened(kernel, rng.standard_normal((n, k), dtype=np.float32) * 0.1)
    assert s.screened
    before = kernel.counters()
    try:
        for trial in range(120):
            row = rng.standard_normal(k) * (10.0 ** rng.uniform(-2, 2))
            full, screened = s.products(row)
            exact = np.isfinite(screened)
            assert np.array_equal(screened[exact], full[exact]), trial  # the same bits
            assert np.all(np.isneginf(screened[~exact]))
            assert int(np.argmax(screened)) == int(np.argmax(full))
            assert greedy_pick(screened) == greedy_pick(full)
    finally:
        s.close()
    after = kernel.counters()
    screened_steps = after["screened"] - before["screened"]
    assert screened_steps > 100  # the first call checks the shape against OpenBLAS instead
    # Most words are never computed: a block or two per step.
    assert after["screen_blocks"] - before["screen_blocks"] < 4 * screened_steps


def test_equal_top_logits_give_the_lower_word_and_near_ties_the_full_product(kernel) -> None:
    rng = np.random.default_rng(1)
    n, k = 2048, 64
    w = rng.standard_normal((n, k), dtype=np.float32) * 0.1
    w[1500] = w[7] = w[7] * 4  # two words with the same, largest logit
    w[900] = w[7] * np.float32(1 + 2**-22)  # a third, a few ulps above them
    s = Screened(kernel, w)
    try:
        row = w[7].astype(np.float64)
        full, screened = s.products(row)
        before = kernel.counters()["screen_fallbacks"]
        full, screened = s.products(row)
        assert kernel.counters()["screen_fallbacks"] == before + 1  # not proven: full product
        assert np.array_equal(screened, full)
        w2 = w.copy()
        w2[900] = w2[0]  # now the tie of 7 and 1500 is the top, with a clear gap below
        s2 = Screened(kernel, w2)
        try:
            full, screened = s2.products(row)
            assert greedy_pick(screened) == greedy_pick(full) == 7
            assert screened[7] == screened[1500] == full[7]
        finally:
            s2.close()
    finally:
        s.close()


def test_a_non_finite_row_computes_the_full_product(kernel) -> None:
    rng = np.random.default_rng(2)
    s = Screened(kernel, rng.standard_normal((1024, 32), dtype=np.float32))
    try:
        s.products(rng.standard_normal(32))  # the shape's first call
        row = rng.standard_normal(32)
        row[3] = np.inf
        full, screened = s.products(row)
        np.testing.assert_array_equal(screened, full)
    finally:
        s.close()


def test_what_cannot_be_screened_is_refused(kernel) -> None:
    rng = np.random.default_rng(3)
    bad = rng.standard_normal((256, 32), dtype=np.float32)
    bad[10, 5] = np.nan
    s = Screened(kernel, bad)
    try:
        assert not s.screened  # a weight that is not finite
    finally:
        s.close()
    loose = mx.array(rng.standard_normal((256, 32), dtype=np.float32))
    mx.eval(loose)
    assert not kernel.screen(np.array(loose, copy=False).ctypes.data, 256, 32)  # not packed
    x = mx.array(rng.standard_normal((1, 32), dtype=np.float32))
    alpha = kernel.screen_alpha
    out = mx.addmm(mx.array(0.0), x, loose.T, alpha=alpha, beta=0.0)  # the ordinary product
    np.testing.assert_array_equal(np.array(out), np.array(x @ loose.T))


@pytest.fixture(params=["tiny_llama", "tiny_gemma"])
def loaded(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


def test_greedy_answers_are_the_same_tokens_screened_or_not(loaded: LoadedModel, kernel) -> None:
    assert routes(loaded.model)
    engine = Engine(loaded)
    params = SamplingParams(max_tokens=30, stop_loops=False, speculation="off")
    before = kernel.counters()
    try:
        for seed in range(4):
            ids = np.random.default_rng(seed).integers(3, 300, 40).tolist()
            prompt = SegmentedPrompt(ids, [20, 40])
            with suspended():
                plain = engine.generate(prompt, params)
            screened = engine.generate(prompt, params)
            assert screened.tokens == plain.tokens, seed
    finally:
        engine.close()
    after = kernel.counters()
    assert (
        after["screened"] + after["screen_fallbacks"]
        > before["screened"] + before["screen_fallbacks"]
    )


def test_only_greedy_steps_of_few_rows_are_screened(tiny_llama: LoadedModel, kernel) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    net = tiny_llama.model
    cache = make_prompt_cache(net)
    mx.eval(net(mx.array([[1, 2, 3, 4]]), cache=cache))
    tried = lambda c: c["screened"] + c["screen_fallbacks"]  # noqa: E731  (rows)
    mx.eval(net(mx.array([[5, 6, 7]]), cache=cache))  # not in a greedy step
    before = tried(kernel.counters())
    with greedy_steps():
        mx.eval(net(mx.array([list(range(10, 19))]), cache=cache))  # 9 rows: the full product
        with greedy_steps(False):
            mx.eval(net(mx.array([[7]]), cache=cache))
    assert tried(kernel.counters()) == before
    with greedy_steps():
        mx.eval(net(mx.array([[8]]), cache=cache))
        mx.eval(net(mx.array([[9, 10, 11]]), cache=cache))  # a short verify: each row screened
    assert tried(kernel.counters()) == before + 4


def test_each_row_of_a_screened_product_is_its_full_rows_argmax(kernel) -> None:
    rng = np.random.default_rng(4)
    n, k = 8192, 80
    s = Screened(kernel, rng.standard_normal((n, k), dtype=np.float32) * 0.1)
    alpha = kernel.screen_alpha
    s.products(rng.standard_normal(k))  # the shape's first call: checked against OpenBLAS
    before = kernel.counters()["screened"]
    try:
        for rows in range(1, 9):
            x = rng.standard_normal((rows, k)) * (10.0 ** rng.uniform(-1, 2, (rows, 1)))
            x = mx.array(x.astype(np.float32))
            full = x @ s.w.T
            screened = mx.addmm(mx.array(0.0), x, s.w.T, alpha=alpha, beta=0.0)
            mx.eval(full, screened)
            f, sc = np.array(full), np.array(screened)
            exact = np.isfinite(sc)
            assert np.array_equal(sc[exact], f[exact]), rows  # the full product's bits
            for r in range(rows):
                assert greedy_pick(sc[r]) == greedy_pick(f[r]) == int(np.argmax(f[r])), rows
    finally:
        s.close()
    assert kernel.counters()["screened"] - before >= 30  # of the 36 rows: proven, not recomputed


def test_a_model_that_transforms_its_logits_is_left_alone(tiny_llama: LoadedModel) -> None:
    """The proof is in the output layer's units: a model that scales or soft-caps the logits
    after it (Granite, Cohere, Gemma 2 in mlx-lm) is not screened."""
    from ragcache.output_screen import output_module

    assert output_module(tiny_llama.model) is not None

    class Scaled(type(tiny_llama.model)):  # type: ignore[misc]
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) / 16.0

    Scaled.__module__ = "mlx_lm.models.granite"
    other = Scaled.__new__(Scaled)
    other.__dict__.update(tiny_llama.model.__dict__)
    assert output_module(other) is None


def test_a_repacked_output_layer_is_screened_again(tiny_llama: LoadedModel, kernel) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    from ragcache.output_screen import install, output_module
    from ragcache.packed_weights import pack_model

    net = tiny_llama.model
    weight = output_module(net)["weight"]  # type: ignore[index]

    def screened_steps() -> int:
        cache = make_prompt_cache(net)
        mx.eval(net(mx.array([[1, 2, 3]]), cache=cache))
        mx.eval(net(mx.array([[7]]), cache=cache))  # a one-row step: its shape checked first
        before = kernel.counters()
        with greedy_steps():
            for token in (4, 5, 6):
                mx.eval(net(mx.array([[token]]), cache=cache))
        after = kernel.counters()
        return sum(after[c] - before[c] for c in ("screened", "screen_fallbacks"))

    assert screened_steps() == 3
    kernel.unpack(np.array(weight, copy=False).ctypes.data)  # drops the screen with the copy
    assert screened_steps() == 0
    pack_model(net, kernel)
    assert install(net, kernel) and routes(net)
    assert screened_steps() == 3
