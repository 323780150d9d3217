"""The decode kernel (ragcache.skinny_gemm): the bits OpenBLAS gives a row inside a prefill, for
decode-sized products (1-8 rows), taken only where proven."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache

from ragcache.blas import blas_status, cpu_flags, skinny_kernel
from ragcache.model_loader import LoadedModel
from ragcache.skinny_gemm import cpu_supports_kernel

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and cpu_supports_kernel(cpu_flags())),
    reason="the kernel is for x86-64 Linux with AVX2 and FMA",
)


def test_active_with_a_found_blocking(kernel) -> None:
    status = blas_status()
    assert status.skinny_gemm, status.skinny_gemm_reason
    assert kernel.blocking is not None and kernel.blocking[0] > 0


# Every one-row matmul shape of the embedded and candidate models (n outputs, k inputs), and odd
# ones: one K block, a split remainder, several blocks.
SHAPES = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),  # SmolLM2-135M
    (1024, 640),
    (256, 640),
    (640, 1024),
    (2048, 640),
    (640, 2048),
    (262144, 640),  # Gemma 3 270M
    (896, 896),
    (128, 896),
    (4864, 896),
    (896, 4864),  # Qwen2.5-0.5B
    (264, 100),
    (384, 64),
    (1000, 2000),
    (8, 333),
]


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_bit_identical_to_openblas(kernel, n: int, k: int) -> None:
    assert kernel.matches_openblas(n, k, seed=1)
    assert kernel.matches_openblas(n, k, seed=2)
    assert kernel.matches_openblas(n, k, seed=3, m=3)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_packed_weights_bit_identical_to_openblas(kernel, n: int, k: int) -> None:
    """Read through its packed copy (16 output rows interleaved, ragcache.packed_weights), a
    weight gives the same bits as OpenBLAS's prefill rows, n not a multiple of 16 included."""
    before = kernel.packed_bytes()
    assert kernel.matches_openblas(n, k, seed=4, packed=True)
    assert kernel.matches_openblas(n, k, seed=5, m=3, packed=True)
    assert kernel.matches_openblas(n, k, seed=6, m=8, packed=True)  # two groups of 4 rows
    assert kernel.packed_bytes() == before  # the probe's copy was dropped again


def test_a_loaded_models_weights_are_packed_and_dropped_with_it(kernel, tmp_path) -> None:
    """load_model packs every decode weight, decode gives the bits of row-major reading, and
    the copies go when the model is collected."""
    import gc

    from ragcache.model_loader import load_model
    from ragcache.output_screen import output_module
    from ragcache.packed_weights import decode_weights
    from tests.tiny_models import LLAMA, build_tiny_model

    before = kernel.packed_bytes()
    model = load_model(str(build_tiny_model(tmp_path / "m", LLAMA)), tmp_path / "home")
    weights = decode_weights(model.model)
    layers = model.model.model.layers
    assert len(weights) == 1 + 7 * len(layers)  # the (untied) output layer and each layer's 7
    expected = sum((w.shape[0] + 15) // 16 * 16 * w.shape[1] * 4 for w in weights)
    # and the output layer's 8-bit screen (ragcache.output_screen): a byte a weight, 2 floats a word
    n, k = output_module(model.model)["weight"].shape
    expected += (n + 15) // 16 * 16 * (k + 8)
    assert kernel.packed_bytes() - before == expected
    hits = kernel.counters()["packed"]
    packed = _decode_logits(model, 12)
    assert kernel.counters()["packed"] >= hits + 12 * len(weights)  # every step read the copies
    for w in weights:
        kernel.unpack(np.array(w, copy=False).ctypes.data)
    assert kernel.packed_bytes() == before
    assert np.array_equal(packed.view(np.uint32), _decode_logits(model, 12).view(np.uint32))
    again = load_model(str(tmp_path / "m"), tmp_path / "home")
    assert kernel.packed_bytes() - before == expected
    del again
    gc.collect()
    assert kernel.packed_bytes() == before


def test_the_registry_reuses_the_slots_of_unregistered_weights(kernel) -> None:
    """Models come and go: more weights than the table has slots (4096), each registered and
    unregistered in turn, all get packed."""
    alive = [np.full((16, 8), i, np.float32) for i in range(4200)]  # distinct addresses
    for a in alive:
        assert kernel.pack(a.ctypes.data, 16, 8)
        kernel.unpack(a.ctypes.data)
    assert kernel.matches_openblas(264, 100, seed=7, packed=True)


def test_registering_an_address_again_copies_what_it_holds_now(kernel) -> None:
    """The address of a weight that was unregistered can hold another array later: registering
    it again packs the new contents, never the old copy."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64), dtype=np.float32)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    for _ in range(2):
        assert kernel.pack(w.ctypes.data, 256, 64)
        try:
            hits = kernel.counters()["packed"]
            got = kernel.product(x, w)
            assert kernel.counters()["packed"] == hits + 1  # read from the packed copy
        finally:
            kernel.unpack(w.ctypes.data)
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
        w[:] = rng.standard_normal((256, 64), dtype=np.float32)


@pytest.mark.parametrize("tied", [False, True])
def test_the_embedding_is_packed_only_when_it_is_the_output_layer(tied: bool) -> None:
    import mlx.nn as nn

    from ragcache.packed_weights import decode_weights

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.proj = nn.Linear(16, 24, bias=False)
            self.odd = nn.Linear(16, 12, bias=False)  # 12 outputs: not a kernel shape
            if not tied:
                self.head = nn.Linear(16, 64, bias=False)

    net = Net()
    mx.eval(net.parameters())

    def address(w: mx.array) -> int:
        return int(np.array(w, copy=False).ctypes.data)

    expected = [net.proj.weight, net.embed.weight if tied else net.head.weight]
    assert sorted(map(address, decode_weights(net))) == sorted(map(address, expected))


@pytest.mark.parametrize(("n", "k"), [(576, 576), (192, 576), (576, 1536), (1024, 640)])
def test_a_decode_row_has_its_prefill_bits(kernel, n: int, k: int) -> None:
    """What exactness needs: a row computed in a 1-8 row product (decode, a batch, a short
    verify) has the bits of the same row inside a 64-row product (a prefill). OpenBLAS builds
    with small-matrix kernels (SkylakeX) break this on their own for small shapes."""
    x = mx.random.normal((64, k), key=mx.random.key(11))
    w = mx.random.normal((n, k), key=mx.random.key(12))
    prefill = np.array(x @ w.T).view(np.uint32)
    for m in range(1, 9):
        rows = np.array(x[:m] @ w.T).view(np.uint32)
        assert np.array_equal(rows, prefill[:m]), m


@pytest.mark.parametrize(("n", "k"), [(576, 576), (1536, 576), (4864, 896), (49152, 576)])
def test_a_packed_weights_rows_have_their_prefill_bits_at_any_size(kernel, n: int, k: int) -> None:
    """A packed weight is taken for products of 1-8 rows of any size (a speculative verify over
    the output layer): each row still has its bits inside a 64-row prefill."""
    x = mx.random.normal((64, k), key=mx.random.key(13))
    w = mx.random.normal((n, k), key=mx.random.key(14))
    prefill = np.array(x @ w.T).view(np.uint32)
    address = np.array(w, copy=False).ctypes.data
    assert kernel.pack(address, n, k)
    try:
        taken = kernel.counters()["taken"]
        for m in (1, 2, 3, 5, 6, 7, 8):  # 6, 7: a group of 4 rows, then 2 or 3
            rows = np.array(x[:m] @ w.T).view(np.uint32)
            assert np.array_equal(rows, prefill[:m]), m
        # Through the kernel: all but a new shape's first call, which is computed both ways.
        assert kernel.counters()["taken"] >= taken + 6
    finally:
        kernel.unpack(address)


def test_a_shape_that_differs_is_left_to_openblas(kernel) -> None:
    """With a wrong K block the first-call check sees other bits: that shape is refused, and the
    product MLX gets is still the row's prefill bits (OpenBLAS's, over a padded product)."""
    x = mx.random.normal((1, 1544), key=mx.random.key(3))
    w = mx.random.normal((264, 1544), key=mx.random.key(4))
    kernel.set_enabled(False)
    expected = np.array((mx.concatenate([x] * 16) @ w.T)[:1])  # tall: OpenBLAS's ordinary path
    k_block, unroll = kernel.blocking
    refused = kernel.counters()["shapes_refused"]
    kernel.configure(True, k_block // 2 + 8, unroll, kernel.threads)  # not this OpenBLAS's block
    try:
        first, second = np.array(x @ w.T), np.array(x @ w.T)
    finally:
        kernel.set_enabled(True)
    assert kernel.counters()["shapes_refused"] == refused + 1
    assert np.array_equal(first, expected) and np.array_equal(second, expected)


def _decode_logits(model: LoadedModel, steps: int) -> np.ndarray:
    net = model.model
    cache = make_prompt_cache(net)
    prompt = mx.array([[1, *range(5, 45)]])
    net(prompt, cache=cache)
    token, rows = mx.array([[7]]), []
    for _ in range(steps):
        logits = net(token, cache=cache)[:, -1, :]
        token = mx.argmax(logits, axis=-1, keepdims=True)
        rows.append(np.array(logits))
    return np.concatenate(rows)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_decode_logits_same_bits_as_the_reference_product(kernel, which: str, request) -> None:
    """Decode through the kernel gives the logits, bit for bit, of decode through OpenBLAS's
    padded product (the bits the kernel must reproduce)."""
    model = request.getfixturevalue(which)
    kernel.set_reference_only(True)
    try:
        reference = _decode_logits(model, 12)
    finally:
        kernel.set_reference_only(False)
    before = kernel.counters()["taken"]
    fast = _decode_logits(model, 12)
    assert kernel.counters()["taken"] > before  # the decode steps went through the kernel
    assert np.array_equal(reference.view(np.uint32), fast.view(np.uint32))


def _check_in_child(queue) -> None:  # type: ignore[no-untyped-def]
    kernel = skinny_kernel()
    assert kernel is not None
    queue.put(kernel.matches_openblas(1536, 576, seed=9))  # two threads: needs its own helper


def test_a_forked_child_computes_without_hanging(kernel) -> None:
    """fork copies only the calling thread: the child starts a helper thread of its own. (MLX
    itself cannot evaluate in a forked child, so this drives the kernel directly.)"""
    import multiprocessing

    assert kernel.matches_openblas(1536, 576, seed=8)  # the parent's helper is running now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_check_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) is True
    child.join(timeout=30)
    assert child.exitcode == 0


def test_a_split_products_second_half_has_the_same_bits_whoever_computes_it(kernel) -> None:
    """On two threads the helper computes a product's second half, unless it has not started
    it (asleep) by the time the caller finishes the first: then the caller takes it back. Both
    ways give the reference bits. Big products back to back find the helper spinning; a small
    one after a pause finds it asleep."""
    import time

    k_block, unroll = kernel.blocking
    threads = kernel.threads
    kernel.configure(True, k_block, unroll, 2)
    try:
        before = kernel.counters()
        for attempt in range(200):
            assert kernel.matches_openblas(4096, 1024, seed=attempt)  # halves of ~0.3 ms
            time.sleep(0.002)  # the helper stops spinning after 30 us and sleeps
            assert kernel.matches_openblas(256, 64, seed=attempt)  # halves of a few us
            after = kernel.counters()
            if (
                after["helper_halves"] > before["helper_halves"]
                and after["halves_taken_back"] > before["halves_taken_back"]
            ):
                break
        else:
            pytest.fail(f"not both ways in 200 attempts: {before} -> {after}")
    finally:
        kernel.configure(True, k_block, unroll, threads)


@pytest.mark.parametrize("k", [16, 64, 256])
@pytest.mark.parametrize("n", [1, 7, 13, 64, 1000, 1003])
def test_products_over_few_inputs_with_up_to_64_rows_are_bit_identical(kernel, n, k) -> None:
    """Attention's scores (queries times keys: k the head size, n the context, any n) are taken
    with up to 256 rows (a verify's grouped heads), read through a transposed tile, with
    OpenBLAS's bits."""
    for m in (1, 3, 9, 33, 64, 100, 231):  # more than 64 rows: in groups of 64
        assert kernel.matches_openblas(n, k, seed=m, m=m), m


def _softmax_reference(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    e = np.exp(scores.astype(np.float64) - scores.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)) @ values.astype(np.float64)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    keys=st.integers(1, 700),
    width=st.sampled_from([1, 5, 8, 64, 70, 256]),
    before=st.integers(0, 40),
    after=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_a_softmax_products_row_has_the_same_bits_whatever_stands_around_it(
    rows: int, keys: int, width: int, before: int, after: int, seed: int
) -> None:
    """softmax(a) b, as attention's smaller calls get it: close to the float64 product, and a
    row's bits do not depend on masked keys before or after its own (a batch's left padding, a
    verify's later draft positions) nor on the other rows of the call."""
    kernel = skinny_kernel()
    assert kernel is not None
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, keys), dtype=np.float32) * 4
    values = rng.standard_normal((keys, width), dtype=np.float32)
    out = kernel.softmax_product(scores, values)
    np.testing.assert_allclose(out, _softmax_reference(scores, values), rtol=2e-5, atol=2e-6)
    lowest = np.finfo(np.float32).min  # MLX's mask value; -inf (an additive mask) too
    masked = np.concatenate(
        [
            np.full((rows, before), lowest, np.float32),
            scores,
            np.full((rows, after), -np.inf, np.float32),
        ],
        axis=1,
    )
    around = rng.standard_normal((before + keys + after, width), dtype=np.float32) * 100
    around[before : before + keys] = values
    assert np.array_equal(
        kernel.softmax_product(masked, around).view(np.uint32), out.view(np.uint32)
    )
    for r in range(rows):
        alone = kernel.softmax_product(scores[r : r + 1], values)
        assert np.array_equal(alone.view(np.uint32), out[r : r + 1].view(np.uint32))


def test_a_nan_score_gives_nan_not_a_number() -> None:
    kernel = skinny_kernel()
    assert kernel is not None
    scores = np.zeros((2, 9), np.float32)
    scores[0, 4] = np.nan
    out = kernel.softmax_product(scores, np.ones((9, 3), np.float32))
    assert np.isnan(out[0]).all() and np.allclose(out[1], 1.0)


def test_mlx_reaches_the_softmax_product_through_addmm_and_nothing_else_takes_it(kernel) -> None:
    """The NaN alpha asks this library's cblas_sgemm for softmax(A) B; a call with that alpha in
    another layout is not taken, and OpenBLAS then gives NaN: loud, never a different number."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 3, 5, 40), dtype=np.float32)
    values = rng.standard_normal((2, 3, 40, 24), dtype=np.float32)
    zero = mx.array(0.0)
    before = kernel.counters()["softmax_products"]
    out = mx.addmm(zero, mx.array(scores), mx.array(values), alpha=kernel.softmax_alpha, beta=0.0)
    mx.eval(out)
    assert kernel.counters()["softmax_products"] == before + 6  # one call per (sequence, head)
    direct = np.stack(
        [
            np.stack([kernel.softmax_product(scores[i, h], values[i, h]) for h in range(3)])
            for i in range(2)
        ]
    )
    assert np.array_equal(np.array(out).view(np.uint32), direct.view(np.uint32))
    # The values stored transposed: MLX passes B with its transpose flag, not the library's call.
    stored_transposed = mx.array(np.ascontiguousarray(values.swapaxes(-1, -2))).swapaxes(-1, -2)
    other = mx.addmm(
        zero, mx.array(scores), stored_transposed, alpha=kernel.softmax_alpha, beta=0.0
    )
    assert np.isnan(np.array(other)).all()


def test_the_softmax_product_refuses_what_it_cannot_compute(kernel) -> None:
    scores, values = np.zeros((2, 5), np.float32), np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="first key"):
        kernel.softmax_product(scores, values, first=5)
    with pytest.raises(ValueError, match="do not chain"):
        kernel.softmax_product(np.zeros((2, 0), np.float32), np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="first key"):
        kernel.softmax_alpha_from(-1)
