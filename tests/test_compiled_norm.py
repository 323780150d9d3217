"""Compiled RMS norms (ragcache.compiled_norm): MLX's own norm, bit for bit, in fewer nodes."""

from __future__ import annotations

import io
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import gemma3_text
from mlx_lm.models.cache import make_prompt_cache

from ragcache import compiled_norm
from ragcache.model_loader import LoadedModel
from ragcache.runtime.lookup import MAX_DRAFT

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.cpu, reason="routed on CPU only (elsewhere MLX has a kernel)"
)


def _bits(x: mx.array) -> np.ndarray:
    return np.array(x).view(np.uint32)


def _routed(model: nn.Module) -> list[nn.Module]:
    compiled = set(compiled_norm.COMPILED.values())
    return [m for m in model.modules() if type(m) in compiled]


def _same_bits_routed_or_not(model: nn.Module, run) -> bool:  # type: ignore[no-untyped-def]
    """Whether `run()` gives the same arrays with the model's norms compiled and with MLX's own
    (the modules are routed again after)."""
    routed = {id(m): type(m) for m in _routed(model)}
    assert routed
    fast = run()
    for m in model.modules():
        if id(m) in routed:
            m.__class__ = type(m).__mro__[1]
    try:
        plain = run()
    finally:
        for m in model.modules():
            if id(m) in routed:
                m.__class__ = routed[id(m)]
    return all(np.array_equal(a, b) for a, b in zip(fast, plain, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    width=st.sampled_from([64, 256, 576, 640, 100]),
    eps=st.sampled_from([1e-5, 1e-6]),
    rows=st.sampled_from([(1, 1), (4, 1), (8, 1), (1, 33), (2, 7), (1, 64)]),
    per_head=st.booleans(),
    gemma=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_same_bits_as_mlx_norm(
    width: int,
    eps: float,
    rows: tuple[int, int],
    per_head: bool,
    gemma: bool,
    scale: float,
    seed: int,
) -> None:
    """Any width, eps, scale of input, a decode step, a batch of them, a verify, per-head
    (4-D) inputs, mlx's norm and Gemma's `1 + weight` one: the compiled call gives MLX's bits."""
    key = mx.random.key(seed)
    norm = gemma3_text.RMSNorm(width, eps) if gemma else nn.RMSNorm(width, eps)
    norm.weight = mx.random.normal((width,), key=mx.random.key(seed + 1))
    plain = gemma3_text.RMSNorm(width, eps) if gemma else nn.RMSNorm(width, eps)
    plain.weight = norm.weight
    assert compiled_norm.install(norm) == 1
    heads = 3 if per_head and 3 * rows[0] * rows[1] <= compiled_norm.MAX_ROWS else 0
    shape = (rows[0], heads, rows[1], width) if heads else (*rows, width)
    x = mx.random.normal(shape, key=key) * scale
    assert np.array_equal(_bits(norm(x)), _bits(plain(x)))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_a_loaded_models_norms_are_compiled_and_its_logits_keep_their_bits(
    which: str, request: pytest.FixtureRequest
) -> None:
    """The loader routes every norm (Gemma: its four per layer, the per-head query and key
    norms and the last); prefill, decode steps and a multi-token verify give the same logits,
    bit for bit, compiled or not."""
    loaded: LoadedModel = request.getfixturevalue(which)
    model = loaded.model
    originals = [m for m in model.modules() if type(m) in compiled_norm.COMPILED]
    assert not originals, "the loader left a norm uncompiled"

    def logits() -> list[np.ndarray]:
        cache = make_prompt_cache(model)
        out = [model(mx.array([list(range(3, 40))]), cache=cache)]
        for token in (5, 9, 11, 2):
            out.append(model(mx.array([[token]]), cache=cache))
        out.append(model(mx.array([[4, 6, 8, 10]]), cache=cache))
        return [_bits(o) for o in out]

    assert _same_bits_routed_or_not(model, logits)


def test_a_decode_step_has_fewer_graph_nodes(tiny_llama: LoadedModel) -> None:
    """What it is for: a norm is three nodes instead of eleven."""
    model = tiny_llama.model
    norms = len(_routed(model))

    def nodes() -> int:
        cache = make_prompt_cache(model)
        model(mx.array([list(range(3, 20))]), cache=cache)
        mx.eval([c.state for c in cache])
        out = io.StringIO()
        mx.export_to_dot(out, model(mx.array([[5]]), cache=cache))
        return len(re.findall(r'label ="', out.getvalue()))

    compiled = nodes()
    routed = {id(m): type(m) for m in _routed(model)}
    for m in model.modules():
        if id(m) in routed:
            m.__class__ = type(m).__mro__[1]
    try:
        plain = nodes()
    finally:
        for m in model.modules():
            if id(m) in routed:
                m.__class__ = routed[id(m)]
    assert plain - compiled >= 6 * norms


def test_prefill_steps_and_other_dtypes_keep_mlxs_call() -> None:
    """More rows than a verify takes, or not float32: MLX's own norm (no compiled entry per
    prefill length), with its bits."""
    norm, plain = nn.RMSNorm(32), nn.RMSNorm(32)
    compiled_norm.install(norm)
    assert type(norm) is compiled_norm.CompiledRMSNorm
    prefill = mx.random.normal((1, compiled_norm.MAX_ROWS + 1, 32))
    half = mx.random.normal((1, 2, 32)).astype(mx.float16)
    for x in (prefill, half):
        assert not compiled_norm._small(x)
        assert np.array_equal(np.array(norm(x)), np.array(plain(x)))


def test_a_speculative_verify_fits_the_compiled_rows() -> None:
    assert 1 + MAX_DRAFT <= compiled_norm.MAX_ROWS


def test_other_norm_classes_are_left_alone() -> None:
    """A subclass or another norm keeps its code: only classes whose call is known are routed."""

    class MyNorm(nn.RMSNorm):
        pass

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.RMSNorm(16)
            self.mine = MyNorm(16)
            self.layer = nn.LayerNorm(16)

    model = Model()
    assert compiled_norm.install(model) == 1
    assert type(model.plain) is compiled_norm.CompiledRMSNorm
    assert type(model.mine) is MyNorm and type(model.layer) is nn.LayerNorm


def test_a_configuration_whose_bits_differ_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check at install is real: a compiled call that changed a bit keeps the module on
    MLX's norm."""

    def off_by_a_bit(x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps) * (1.0 + 2.0**-20)

    monkeypatch.setattr(compiled_norm, "_plain_compiled", off_by_a_bit)
    norm = nn.RMSNorm(16)
    norm.weight = mx.random.normal((16,))
    assert compiled_norm.install(norm) == 0
    assert type(norm) is nn.RMSNorm
