"""The decode kernel (ragcache.skinny_gemm): OpenBLAS's exact bits, taken only where proven."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ragcache.blas import blas_status, cpu_flags, skinny_kernel
from ragcache.model_loader import LoadedModel
from ragcache.skinny_gemm import cpu_supports_kernel

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and cpu_supports_kernel(cpu_flags())),
    reason="the kernel is for x86-64 Linux with AVX2 and FMA",
)


@pytest.fixture()
def kernel():
    k = skinny_kernel()
    assert k is not None, blas_status().skinny_gemm_reason
    yield k
    k.set_enabled(True)


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


def test_a_shape_that_differs_is_left_to_openblas(kernel) -> None:
    """With a wrong K block the first-call check sees other bits: that shape stays OpenBLAS's,
    and the product MLX gets is OpenBLAS's."""
    x = mx.random.normal((1, 1544), key=mx.random.key(3))
    w = mx.random.normal((264, 1544), key=mx.random.key(4))
    kernel.set_enabled(False)
    expected = np.array(x @ w.T)
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
def test_decode_logits_same_bits_with_and_without(kernel, which: str, request) -> None:
    model = request.getfixturevalue(which)
    kernel.set_enabled(False)
    plain = _decode_logits(model, 12)
    kernel.set_enabled(True)
    before = kernel.counters()["taken"]
    fast = _decode_logits(model, 12)
    assert kernel.counters()["taken"] > before  # the decode steps went through the kernel
    assert np.array_equal(plain.view(np.uint32), fast.view(np.uint32))


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
