"""Compiled RMS norms (ragcache.compiled_norm): MLX's own norm, bit for bit, in fewer nodes."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import gemma3_text
from mlx_lm.models.cache import make_prompt_cache

from ragcache import compiled_norm
from ragcache.model_loader import LoadedModel, load_model
from ragcache.runtime.lookup import MAX_DRAFT
from tests.tiny_models import LLAMA, build_tiny_model, step_logit_bits

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.cpu or not compiled_norm.compiler_available(),
    reason="routed on CPU only (elsewhere MLX has a kernel), where MLX's compiler (g++) is",
)


def _bits(x: mx.array) -> np.ndarray:
    return np.array(x).view(np.uint32)


def _routed(model: nn.Module) -> list[nn.Module]:
    compiled = {target for target, _ in compiled_norm.ROUTES.values()}
    return [m for m in model.modules() if type(m) in compiled]


@contextlib.contextmanager
def _unrouted(routed: list[nn.Module]) -> Iterator[None]:
    """The routed modules back on their original class (MLX's norm), routed again after."""
    classes = [type(m) for m in routed]
    for m in routed:
        m.__class__ = type(m).__mro__[1]
    try:
        yield
    finally:
        for m, cls in zip(routed, classes, strict=True):
            m.__class__ = cls


def _same_bits_routed_or_not(model: nn.Module, run: Callable[[], list[np.ndarray]]) -> bool:
    """Whether `run()` gives the same arrays with the model's norms compiled and with MLX's own."""
    routed = _routed(model)
    assert routed
    fast = run()
    with _unrouted(routed):
        plain = run()
    return all(np.array_equal(a, b) for a, b in zip(fast, plain, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    width=st.sampled_from([64, 256, 576, 640, 100]),
    eps=st.sampled_from([1e-5, 1e-6]),
    rows=st.sampled_from([(1, 1), (4, 1), (8, 1), (1, 33), (2, 7), (1, 64)]),
    per_head=st.booleans(),
    transposed=st.booleans(),
    gemma=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_same_bits_as_mlx_norm(
    width: int,
    eps: float,
    rows: tuple[int, int],
    per_head: bool,
    transposed: bool,
    gemma: bool,
    scale: float,
    seed: int,
) -> None:
    """Any width, eps, scale of input, a decode step, a batch of them, a verify, per-head
    (4-D) inputs and their transposed views (attention's per-head norms get those), mlx's norm
    and Gemma's `1 + weight` one: the compiled call gives MLX's bits."""
    norm = gemma3_text.RMSNorm(width, eps) if gemma else nn.RMSNorm(width, eps)
    norm.weight = mx.random.normal((width,), key=mx.random.key(seed + 1))
    plain = gemma3_text.RMSNorm(width, eps) if gemma else nn.RMSNorm(width, eps)
    plain.weight = norm.weight
    assert compiled_norm.install(norm) == 1
    heads = 3 if per_head and 3 * rows[0] * rows[1] <= compiled_norm.MAX_ROWS else 0
    shape = (rows[0], rows[1], heads, width) if heads else (*rows, width)
    x = mx.random.normal(shape, key=mx.random.key(seed)) * scale
    if heads and transposed:
        x = x.transpose(0, 2, 1, 3)
    assert compiled_norm._small(x)
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
    originals = [m for m in model.modules() if type(m) in compiled_norm.ROUTES]
    assert not originals, "the loader left a norm uncompiled"

    assert _same_bits_routed_or_not(model, lambda: step_logit_bits(model))


def test_a_decode_step_has_fewer_graph_nodes(tiny_llama: LoadedModel) -> None:
    """What it is for: a norm is three nodes instead of eleven."""
    model = tiny_llama.model
    routed = _routed(model)

    def nodes() -> int:
        cache = make_prompt_cache(model)
        model(mx.array([list(range(3, 20))]), cache=cache)
        mx.eval([c.state for c in cache])
        out = io.StringIO()
        mx.export_to_dot(out, model(mx.array([[5]]), cache=cache))
        return len(re.findall(r'label ="', out.getvalue()))

    compiled = nodes()
    with _unrouted(routed):
        plain = nodes()
    assert plain - compiled >= 6 * len(routed)


def test_prefill_steps_and_other_dtypes_keep_mlxs_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than `MAX_ROWS` (heads count), or not float32: MLX's own norm (no compiled
    entry per prefill length)."""
    norm = nn.RMSNorm(32)
    compiled_norm.install(norm)
    assert type(norm) is compiled_norm.CompiledRMSNorm

    def refuse(module: nn.Module, x: mx.array) -> mx.array:
        raise AssertionError("took the compiled call")

    monkeypatch.setattr(compiled_norm, "_fused_plain", refuse)
    prefill = mx.random.normal((1, compiled_norm.MAX_ROWS + 1, 32))
    many_heads = mx.random.normal((1, 5, 13, 32))  # 65 rows
    half = mx.random.normal((1, 2, 32)).astype(mx.float16)
    for x in (prefill, many_heads, half):
        mx.eval(norm(x))
    with pytest.raises(AssertionError, match="compiled call"):
        norm(mx.random.normal((1, 1, 32)))


def test_a_verify_of_the_longest_draft_takes_the_compiled_call(tiny_llama: LoadedModel) -> None:
    """A sequence's verify normalizes 1 + MAX_DRAFT rows."""
    x = mx.random.normal((1, 1 + MAX_DRAFT, tiny_llama.model.args.hidden_size))
    assert compiled_norm._small(x)


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


def test_a_norm_with_more_state_is_left_alone() -> None:
    """A norm holding anything besides its weight (a bias a later version might add) is not
    the call the compiled function reproduces."""
    norm = nn.RMSNorm(16)
    norm.bias = mx.zeros((16,))
    assert compiled_norm.install(norm) == 0


@pytest.mark.parametrize("gemma", [False, True])
def test_a_configuration_whose_bits_differ_is_left_alone(
    gemma: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check at install is real: a compiled call that changed a bit keeps the module on
    MLX's norm (either routed class)."""
    name = "_one_plus_compiled" if gemma else "_plain_compiled"
    exact = getattr(compiled_norm, name)

    def off_by_a_bit(x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return exact(x, weight, eps) * (1.0 + 2.0**-20)

    monkeypatch.setattr(compiled_norm, name, off_by_a_bit)
    original = gemma3_text.RMSNorm if gemma else nn.RMSNorm
    norm = original(16)
    norm.weight = mx.random.normal((16,))
    assert compiled_norm.install(norm) == 0
    assert type(norm) is original


def test_turned_off_the_loader_keeps_mlxs_norms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAGCACHE_COMPILED_NORMS=0: every norm stays MLX's."""
    monkeypatch.setenv("RAGCACHE_COMPILED_NORMS", "0")
    folder = build_tiny_model(tmp_path / "llama", LLAMA)
    loaded = load_model(str(folder), tmp_path / "home")
    assert not _routed(loaded.model)
    assert any(type(m) is nn.RMSNorm for m in loaded.model.modules())
