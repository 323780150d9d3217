"""Exact 4-bit codes (ragcache.q4_weights) and the decode kernel reading them (native/skinny_gemm.c
q4_rows): the codes rebuild a GGUF-dequantized weight bit for bit, and a decode row read through
them has the bits of the same row inside a prefill."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.blas import cpu_flags
from ragcache.q4_weights import GROUP, Q4Codes, find_codes, kernel_layout, layout_bytes
from ragcache.skinny_gemm import cpu_supports_kernel

needs_kernel = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and cpu_supports_kernel(cpu_flags())),
    reason="the kernel is for x86-64 Linux with AVX2 and FMA",
)


def q4_1_dequantized(weight: np.ndarray) -> np.ndarray:
    """`weight` through a GGUF's Q4_1 and back, as llama.cpp quantizes a block
    (quantize_row_q4_1_ref: d and the minimum kept as float16, codes from the unrounded ones) and
    as the `gguf` package dequantizes it (float32 d * q + m), which is what the embedded models'
    float32 weights are."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // GROUP, GROUP).astype(np.float32)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    d = (high - low) / np.float32(15)
    inverse = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.minimum(15, ((blocks - low[..., None]) * inverse[..., None] + 0.5).astype(np.int8))
    d16 = d.astype(np.float16).astype(np.float32)
    m16 = low.astype(np.float16).astype(np.float32)
    return (d16[..., None] * q.astype(np.float32) + m16[..., None]).reshape(n, k)


def random_q4_weight(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return q4_1_dequantized(rng.standard_normal((n, k), dtype=np.float32) * 0.05)


def test_the_codes_of_a_q4_1_weight_rebuild_it_bit_for_bit() -> None:
    weight = random_q4_weight(48, 576, seed=1)
    found = find_codes(weight)
    assert found is not None
    assert found.codes.max() <= 15 and found.codes.dtype == np.uint8
    assert found.scale.shape == (48, 576 // GROUP) == found.offset.shape
    assert np.array_equal(found.rebuild().view(np.uint32), weight.view(np.uint32))


def test_a_constant_block_has_scale_zero() -> None:
    weight = random_q4_weight(16, 64, seed=2)
    weight[3, 32:] = np.float32(0.25)
    found = find_codes(weight)
    assert found is not None and found.scale[3, 1] == 0 and found.offset[3, 1] == np.float32(0.25)
    assert np.array_equal(found.rebuild().view(np.uint32), weight.view(np.uint32))


@pytest.mark.parametrize(
    "why",
    ["float weights", "17 levels", "not a multiple of 32", "nan", "float64", "negative zero"],
)
def test_what_is_not_exact_codes_keeps_its_float_copy(why: str) -> None:
    weight = random_q4_weight(16, 64, seed=3)
    if why == "float weights":
        weight = np.random.default_rng(4).standard_normal((16, 64), dtype=np.float32)
    elif why == "17 levels":  # one block with 17 evenly spaced values: no 4-bit code holds it
        weight[0, :17] = np.arange(17, dtype=np.float32) / 16
        weight[0, 17:32] = 0.0
    elif why == "not a multiple of 32":
        weight = random_q4_weight(16, 96, seed=3)[:, :80].copy()
    elif why == "nan":
        weight[5, 7] = np.nan
    elif why == "float64":
        weight = weight.astype(np.float64)
    else:  # q * scale + (-0.0) is +0.0 for q = 0 and a scale >= 0: -0.0 cannot be rebuilt
        weight[2, :32] = np.float32(-0.0)
    assert find_codes(weight) is None


def _read_layout(layout: np.ndarray, n: int, k: int) -> Q4Codes:
    """kernel_layout read back, as native/skinny_gemm.c q4_rows reads it."""
    blocks, groups = -(-n // 16), k // GROUP
    raw = layout.reshape(blocks, groups, 384)
    scale = raw[..., :64].copy().view(np.float32).transpose(0, 2, 1).reshape(-1, groups)
    offset = raw[..., 64:128].copy().view(np.float32).transpose(0, 2, 1).reshape(-1, groups)
    packed = raw[..., 128:].reshape(blocks, groups, GROUP, 8)
    low, high = packed & 0x0F, packed >> 4  # rows 0-7, rows 8-15 of the block
    codes = np.concatenate([low, high], axis=-1)  # (blocks, groups, GROUP, 16)
    codes = codes.transpose(0, 3, 1, 2).reshape(blocks * 16, k)
    return Q4Codes(scale[:n], offset[:n], codes[:n])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_kernel_layout_holds_every_code_scale_and_offset(n: int, groups: int, seed: int):
    weight = random_q4_weight(n, groups * GROUP, seed)
    found = find_codes(weight)
    assert found is not None
    layout = kernel_layout(found)
    assert layout.dtype == np.uint8 and layout.size == layout_bytes(n, groups * GROUP)
    back = _read_layout(layout, n, groups * GROUP)
    assert np.array_equal(back.codes, found.codes)
    assert np.array_equal(back.scale, found.scale) and np.array_equal(back.offset, found.offset)


def split_block_k(kernel) -> int | None:
    """An input count, a multiple of 32, that OpenBLAS splits into two K blocks whose boundary
    falls inside a group of 32 (a remainder between one and two blocks is halved, rounded up to
    the unroll), or None where this machine's blocking never does that."""
    k_block, unroll = kernel.blocking
    for k in range(k_block + GROUP, 2 * k_block, GROUP):
        half = (k + 1) // 2
        half = (half + unroll - 1) // unroll * unroll
        if half % GROUP:
            return k
    return None


@needs_kernel
@pytest.mark.parametrize(
    ("n", "k"), [(576, 576), (192, 576), (1536, 576), (576, 1536), (264, 96), (72, "split")]
)
def test_a_row_read_through_the_codes_has_its_prefill_bits(kernel, n: int, k) -> None:
    """Decode rows, batches and verifies (1-8 rows) over a weight held as codes: each row has the
    bits it gets inside a 64-row prefill, computed by OpenBLAS's reference product over the float32
    weight. `split`: a K block starts inside a group of 32 inputs."""
    if k == "split":
        k = split_block_k(kernel)
        if k is None:
            pytest.skip("this OpenBLAS's K blocks always split on multiples of 32")
    w_np = random_q4_weight(n, k, seed=n + k)
    w = mx.array(w_np)
    x = mx.random.normal((64, k), key=mx.random.key(5))
    kernel.set_reference_only(True)
    try:
        prefill = np.array(x @ w.T).view(np.uint32)
    finally:
        kernel.set_reference_only(False)
    address = np.array(w, copy=False).ctypes.data
    found = find_codes(w_np)
    assert found is not None
    layout = kernel_layout(found)
    assert layout.nbytes * 5 < (n + 15) // 16 * 16 * k * 4  # under a fifth of the float copy
    before = kernel.packed_bytes()
    assert kernel.pack_q4(address, n, k, layout)
    try:
        assert kernel.packed_bytes() - before == layout.nbytes
        packed = kernel.counters()["packed"]
        for m in (1, 2, 3, 4, 5, 7, 8):
            rows = np.array(x[:m] @ w.T).view(np.uint32)
            assert np.array_equal(rows, prefill[:m]), m
        assert kernel.counters()["packed"] >= packed + 6  # read from the codes
    finally:
        kernel.unpack(address)
    assert kernel.packed_bytes() == before


@needs_kernel
def test_the_kernel_refuses_codes_it_cannot_read(kernel) -> None:
    """Codes of the wrong size are an error; codes for k not a multiple of 32, or that do not
    rebuild the weight bit for bit (checked in C), register nothing: the float copy stays."""
    w = random_q4_weight(16, 64, seed=9)
    found = find_codes(w)
    assert found is not None
    with pytest.raises(ValueError, match="768 bytes"):
        kernel.pack_q4(w.ctypes.data, 16, 64, kernel_layout(found)[:-1])
    before = kernel.packed_bytes()
    odd = np.zeros((16, 48), np.float32)
    assert not kernel.pack_q4(odd.ctypes.data, 16, 48, np.zeros(384, np.uint8))
    wrong = Q4Codes(found.scale, found.offset, (found.codes + 1) % 16)
    assert not kernel.pack_q4(w.ctypes.data, 16, 64, kernel_layout(wrong))
    assert kernel.packed_bytes() == before


@needs_kernel
def test_a_loaded_q4_model_decodes_with_the_bits_of_its_float_copies(
    kernel, tmp_path, monkeypatch
) -> None:
    """A model whose weights are Q4_1-dequantized (as the embedded SmolLM2's layers are): every
    layer weight is registered as codes, at a fifth of the float copies' memory, and its decode
    logits have the bits of the same model read through float copies and of OpenBLAS's
    reference product."""
    import gc

    from safetensors.numpy import load_file, save_file

    from ragcache.model_loader import load_model
    from ragcache.packed_weights import decode_weights
    from tests.tiny_models import LLAMA, build_tiny_model, step_logit_bits

    folder = build_tiny_model(tmp_path / "m", LLAMA)
    (weights_file,) = folder.glob("*.safetensors")
    tensors = load_file(weights_file)
    for name, value in tensors.items():
        if value.ndim == 2 and "layers" in name:
            tensors[name] = q4_1_dequantized(value)
    save_file(tensors, weights_file, metadata={"format": "mlx"})

    before = kernel.packed_bytes()
    model = load_model(str(folder), tmp_path / "home")
    layer_weights = [w for w in decode_weights(model.model) if w.shape[0] != LLAMA.vocab_size]
    float_bytes = sum((w.shape[0] + 15) // 16 * 16 * w.shape[1] * 4 for w in layer_weights)
    q4_bytes = sum(layout_bytes(*w.shape) for w in layer_weights)
    n, k = LLAMA.vocab_size, LLAMA.hidden_size  # the output layer: float copy and its screen
    head = n * k * 4 + n * (k + 8)
    assert kernel.packed_bytes() - before == q4_bytes + head
    assert model.packed is not None and model.packed.q4_matrices == len(layer_weights)
    assert q4_bytes * 5 < float_bytes
    packed = kernel.counters()["packed"]
    through_codes = step_logit_bits(model.model)  # a prefill, decode steps and a verify
    assert kernel.counters()["packed"] > packed
    kernel.set_reference_only(True)
    try:
        reference = step_logit_bits(model.model)
    finally:
        kernel.set_reference_only(False)
    assert all(map(np.array_equal, through_codes, reference))
    del model
    gc.collect()
    assert kernel.packed_bytes() == before

    monkeypatch.setenv("RAGCACHE_Q4_WEIGHTS", "0")
    floats = load_model(str(folder), tmp_path / "home")
    assert kernel.packed_bytes() - before == float_bytes + head
    assert floats.packed is not None and floats.packed.q4_matrices == 0
    assert all(map(np.array_equal, step_logit_bits(floats.model), through_codes))
