"""Rope from tables (ragcache.rope_table): MLX's own rope, bit for bit, for less work a call."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.rope_utils import Llama3RoPE

from ragcache import rope_table
from ragcache.model_loader import LoadedModel
from ragcache.runtime.lookup import MAX_DRAFT
from tests.tiny_models import step_logit_bits

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.cpu, reason="routed on CPU only (elsewhere MLX has a kernel)"
)


def _bits(x: mx.array) -> np.ndarray:
    return np.array(x).view(np.uint32)


def _mlx_rope(x: mx.array, table: rope_table.RopeTable, traditional: bool, offset) -> mx.array:  # type: ignore[no-untyped-def]
    return mx.fast.rope(
        x, table.dims, traditional=traditional, base=table.base, scale=table.scale, offset=offset
    )


def _same_bits_routed_or_not(routed: list, run) -> bool:  # type: ignore[no-untyped-def,type-arg]
    """Whether `run()` gives the same arrays with `routed` through the tables and through
    MLX's own rope (the modules are routed again after)."""
    fast = run()
    for m in routed:
        m.__class__ = nn.RoPE
    try:
        plain = run()
    finally:
        for m in routed:
            m.__class__ = rope_table.TableRoPE
    return all(np.array_equal(a, b) for a, b in zip(fast, plain, strict=True))


CONFIGS = [  # (dims, head size, base, scale, traditional): SmolLM2, Gemma 3 local and global, ...
    (64, 64, 100000.0, 1.0, False),
    (256, 256, 10000.0, 1.0, False),
    (256, 256, 1000000.0, 0.125, False),
    (64, 64, 10000.0, 1.0, True),
    (32, 48, 500000.0, 1.0, True),  # a rope over part of the head
    (32, 48, 10000.0, 1.0, False),
]


@pytest.mark.parametrize(("dims", "head", "base", "scale", "traditional"), CONFIGS)
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    length=st.sampled_from([1, 2, 7, 33, 64]),
    offsets=st.lists(st.integers(0, 9000), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_same_bits_as_mlx_rope(
    dims: int,
    head: int,
    base: float,
    scale: float,
    traditional: bool,
    batch: int,
    heads: int,
    length: int,
    offsets: list[int],
    seed: int,
) -> None:
    """Any position (past the first table's 4096 rows too: it grows), one row or many, an int
    offset or one per sequence of a batch (batched decode's), gives MLX's rope's bits."""
    table = rope_table.RopeTable(dims, base, scale)
    x = mx.random.normal((batch, heads, length, head), key=mx.random.key(seed))
    got = rope_table.rope(x, offsets[0], table, traditional)
    assert np.array_equal(_bits(got), _bits(_mlx_rope(x, table, traditional, offsets[0])))
    per_sequence = mx.array(offsets[:batch])
    table.cover(max(offsets) + length)  # what install does up front for the model's context
    got = rope_table.rope(x, per_sequence, table, traditional)
    assert np.array_equal(_bits(got), _bits(_mlx_rope(x, table, traditional, per_sequence)))


def test_the_table_grows_by_doubling_and_keeps_its_rows() -> None:
    table = rope_table.RopeTable(64, 10000.0, 1.0)
    table.cover(10)
    assert table.rows == rope_table._FIRST_ROWS
    first = _bits(table.cos[:100])
    table.cover(table.rows + 1)
    assert table.rows == 2 * rope_table._FIRST_ROWS
    assert np.array_equal(first, _bits(table.cos[:100]))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_a_loaded_models_rope_is_routed_and_its_logits_keep_their_bits(
    which: str, request: pytest.FixtureRequest
) -> None:
    """The loader routes every nn.RoPE (Gemma: local and global configurations); prefill,
    decode steps and a multi-token verify give the same logits, bit for bit, routed or not."""
    loaded: LoadedModel = request.getfixturevalue(which)
    model = loaded.model
    routed = [m for m in model.modules() if isinstance(m, rope_table.TableRoPE)]
    assert routed and all(m._table.rows >= loaded.context_length for m in routed)

    assert _same_bits_routed_or_not(routed, lambda: step_logit_bits(model))


def test_other_rope_classes_are_left_alone() -> None:
    """Llama 3's rope (its own frequencies) and any subclass keep their code."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.RoPE(16)
            self.llama3 = Llama3RoPE(
                16,
                max_position_embeddings=2048,
                base=500000.0,
                scaling_config={
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 1024,
                },
            )

    model = Model()
    assert rope_table.install(model, 2048) == 1
    assert type(model.plain) is rope_table.TableRoPE
    assert type(model.llama3) is Llama3RoPE


def test_inputs_it_was_not_checked_on_go_to_mlx() -> None:
    """Not float32, not (batch, heads, length, dims), or a prefill step: MLX's own rope."""
    rope = nn.RoPE(16)
    plain = nn.RoPE(16)
    rope_table.install(rope, 512)
    assert type(rope) is rope_table.TableRoPE
    half = mx.random.normal((1, 2, 3, 16)).astype(mx.float16)
    three_dims = mx.random.normal((2, 3, 16))
    prefill = mx.random.normal((1, 2, rope_table.MAX_ROWS + 1, 16))
    for x in (half, three_dims, prefill):
        assert np.array_equal(_bits(rope(x, offset=7)), _bits(plain(x, offset=7)))


def test_a_speculative_verify_fits_the_tables_rows_and_margin() -> None:
    assert 1 + MAX_DRAFT <= rope_table.MAX_ROWS <= rope_table.MARGIN_POSITIONS


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_a_left_padded_batch_keeps_its_bits(which: str, request: pytest.FixtureRequest) -> None:
    """Batched decode as the worker runs it: two sequences of different lengths prefilled alone,
    merged into mlx-lm's batch caches (the shorter one left-padded: per-sequence array offsets,
    negative under the padding), then decode steps and a verify of several tokens. Each
    sequence's logits have the same bits routed or not."""
    loaded: LoadedModel = request.getfixturevalue(which)
    model = loaded.model
    routed = [m for m in model.modules() if isinstance(m, rope_table.TableRoPE)]
    assert routed

    def logits() -> list[np.ndarray]:
        caches = []
        for prompt in (list(range(3, 30)), list(range(7, 16))):
            cache = make_prompt_cache(model)
            model(mx.array([prompt]), cache=cache)
            caches.append(cache)
        batch = [type(layer[0]).merge(list(layer)) for layer in zip(*caches, strict=True)]
        out = []
        for step in ([[5], [6]], [[9], [2]], [[4, 6, 8], [1, 3, 5]]):
            out.append(_bits(model(mx.array(step), cache=batch)))
        return out

    assert _same_bits_routed_or_not(routed, logits)


def test_negative_offsets_go_to_mlx() -> None:
    """Chunk reuse re-rotates keys back by a negative offset: not a row of the table."""
    rope = nn.RoPE(16)
    plain = nn.RoPE(16)
    rope_table.install(rope, 512)
    x = mx.random.normal((1, 2, 5, 16))
    assert np.array_equal(_bits(rope(x, offset=-37)), _bits(plain(x, offset=-37)))
