"""RMS normalization of decode steps in one compiled call, bit for bit MLX's own on CPU.

MLX has no CPU kernel for `mx.fast.rms_norm`: each call runs its fallback, eleven graph nodes
(square, sum, a product by 1/n, eps, rsqrt, two products and the broadcasts between them), and
Gemma 3's norm adds `1 + weight` on top. A decode step is mostly such small nodes on this CPU:
SmolLM2's step has ~2,500, 61 norms make ~670 of them, and MLX spends a few microseconds of CPU
on each node whatever its size (2 cores: that time is taken from the weight products). Here the
same fallback runs inside `mx.compile`, which fuses its elementwise tail into one kernel: a norm
is three nodes (square, sum, the rest).

The bits are MLX's: the compiled function is the fallback's own graph, element for element, and
`install` checks each norm's configuration against the original on probes (one and several rows,
3-D and 4-D inputs) and leaves it alone if any bit differs. Nothing that depends on numerics
changes: cached KV stays valid and the model's cache identity does not change.

Calls of at most `MAX_ROWS` rows take it (decode steps, batches of them, speculative verifies);
prefill steps keep the original call: a norm there is nothing next to the step's products, and
MLX keeps one compiled entry per input shape, never evicted.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

MAX_ROWS = 64


def _plain(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def _one_plus(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, 1.0 + weight, eps)  # Gemma's norm scales by 1 + weight


_plain_compiled = mx.compile(_plain)
_one_plus_compiled = mx.compile(_one_plus)


def _small(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.ndim >= 2 and x.size <= MAX_ROWS * x.shape[-1]


class CompiledRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` whose small calls run compiled (the class `install` gives such modules)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _small(x):
            return _plain_compiled(x, self["weight"], self.eps)
        return super().__call__(x)


def _one_plus_classes() -> dict[type, type]:
    """mlx-lm norm classes whose call is `mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)`,
    each with its compiled subclass. Others (and models that are not loaded) are left alone."""
    out: dict[type, type] = {}
    try:
        from mlx_lm.models import gemma3_text
    except ImportError:  # an mlx-lm without it: nothing to route
        return out
    base = gemma3_text.RMSNorm

    def call(self: Any, x: mx.array) -> mx.array:
        if _small(x):
            return _one_plus_compiled(x, self.weight, self.eps)
        return base.__call__(self, x)

    out[base] = type("CompiledOnePlusRMSNorm", (base,), {"__call__": call})
    return out


# Original class -> its compiled subclass: the only classes `install` routes.
COMPILED: dict[type, type] = {nn.RMSNorm: CompiledRMSNorm, **_one_plus_classes()}


def install(model: Any) -> int:
    """Route `model`'s RMS norms (mlx's `nn.RMSNorm` and Gemma 3's `1 + weight` norm) through
    the compiled call; how many were. CPU only (elsewhere `mx.fast.rms_norm` is one kernel).
    Each (class, width, eps) is checked against the original call first, with that module's
    own weight, and left alone if any bit differs."""
    if mx.default_device().type != mx.cpu:
        return 0
    verdicts: dict[tuple[type, int, float], bool] = {}
    routed = 0
    for module in model.modules():
        original = type(module)
        target = COMPILED.get(original)
        if target is None:
            continue
        width = int(module.weight.shape[-1])
        key = (original, width, float(module.eps))
        if key not in verdicts:
            verdicts[key] = same_bits(module, target)
        if verdicts[key]:
            module.__class__ = target
            routed += 1
    return routed


def same_bits(module: nn.Module, target: type) -> bool:
    """Whether `target`'s call gives `module`'s own call's bits on random probes: one row, a
    batch of rows, a verify's rows, and 4-D inputs (per-head norms), all within `MAX_ROWS`."""
    width = int(module.weight.shape[-1])
    key = mx.random.key(11)
    original = type(module)
    for shape in ((1, 1, width), (4, 1, width), (1, 9, width), (1, 4, 7, width)):
        x = mx.random.normal(shape, key=key) * 3.0
        want = module(x)
        module.__class__ = target
        try:
            got = module(x)
        finally:
            module.__class__ = original
        if (
            want.shape != got.shape
            or not mx.array_equal(want.view(mx.uint32), got.view(mx.uint32)).item()
        ):
            return False
    return True
