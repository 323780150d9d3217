"""RMS normalization of decode steps in one compiled call, bit for bit MLX's own on CPU.

MLX has no CPU kernel for `mx.fast.rms_norm`: each call runs its fallback, eleven graph nodes
(square, sum, a product by 1/n, eps, rsqrt, two products and the broadcasts between them), and
Gemma 3's norm adds `1 + weight` on top. A decode step is mostly such small nodes on this CPU:
SmolLM2's step has ~2,500, 61 norms make ~670 of them, and MLX spends a few microseconds of CPU
on each node whatever its size (2 cores: that time is taken from the weight products). Here the
same fallback runs inside `mx.compile`, which fuses its elementwise tail into one kernel: a norm
is three nodes (square, sum, the rest). MLX fuses only where its CPU compiler (g++) is present.

The bits are MLX's: the compiled function is the fallback's own graph, element for element (MLX
compiles it with `-std=c++17 -O3` and no `-march`, so nothing is contracted into a fused
multiply-add), and `install` checks each norm configuration against the original on probes
(one and many rows, batches, per-head 4-D inputs, transposed views) and leaves it alone if any
bit differs. Nothing that depends on numerics changes: cached KV stays valid and the model's
cache identity does not change.

Calls of at most `MAX_ROWS` normalized rows (every leading dimension counts, heads included)
take it: decode steps, batches of them, short speculative verifies and prompt tails; longer
calls (prefill steps) keep the original call, where a norm is nothing next to the step's
products, and MLX keeps one compiled entry per input shape, never evicted.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

MAX_ROWS = 64


def _plain(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def _one_plus(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, 1.0 + weight, eps)  # Gemma's norm scales by 1 + weight


_plain_compiled = mx.compile(_plain)
_one_plus_compiled = mx.compile(_one_plus)


def _small(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.ndim >= 2 and x.size <= MAX_ROWS * x.shape[-1]


# The compiled call of each routed class, looked up when called (a test swaps one).
def _fused_plain(module: Any, x: mx.array) -> mx.array:
    return _plain_compiled(x, module["weight"], module.eps)


def _fused_one_plus(module: Any, x: mx.array) -> mx.array:
    return _one_plus_compiled(x, module.weight, module.eps)


class CompiledRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` whose small calls run compiled (the class `install` gives such modules)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _small(x):
            return _fused_plain(self, x)
        return super().__call__(x)


def _one_plus_routes() -> dict[type, tuple[type, Callable[[Any, mx.array], mx.array]]]:
    """mlx-lm's Gemma 3 norm (`mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)`) with its
    compiled subclass; nothing when this mlx-lm has no such class or it is mlx's own norm."""
    try:
        from mlx_lm.models import gemma3_text
    except ImportError:
        return {}
    found = getattr(gemma3_text, "RMSNorm", None)
    if not isinstance(found, type) or found is nn.RMSNorm or not issubclass(found, nn.Module):
        return {}
    base: type = found

    class CompiledOnePlusRMSNorm(base):  # type: ignore[misc,valid-type]
        """Gemma 3's norm whose small calls run compiled."""

        def __call__(self, x: mx.array) -> mx.array:
            if _small(x):
                return _fused_one_plus(self, x)
            return base.__call__(self, x)

    return {base: (CompiledOnePlusRMSNorm, _fused_one_plus)}


# Original class -> (its compiled subclass, the compiled call): the only classes routed.
ROUTES: dict[type, tuple[type, Callable[[Any, mx.array], mx.array]]] = {
    nn.RMSNorm: (CompiledRMSNorm, _fused_plain),
    **_one_plus_routes(),
}


def compiler_available() -> bool:
    """Whether MLX can fuse here: its CPU compiler shells out to g++ (without it, a compiled
    function runs unfused, node for node)."""
    return shutil.which("g++") is not None


def install(model: Any) -> int:
    """Route `model`'s RMS norms (mlx's `nn.RMSNorm` and Gemma 3's `1 + weight` norm, exactly
    those classes, holding only their weight) through the compiled call; how many were. Changes
    the modules' classes. CPU only (elsewhere `mx.fast.rms_norm` is one kernel), and only where
    MLX's compiler is present. Each configuration (class, width, eps, weight dtype) is checked
    against the original call first, with the weight of its first module, and left alone if any
    bit differs (logged)."""
    if mx.default_device().type != mx.cpu or not compiler_available():
        return 0
    verdicts: dict[tuple[type, int, float, Any], bool] = {}
    routed = 0
    for module in model.modules():
        original = type(module)
        route = ROUTES.get(original)
        if route is None or set(module.keys()) != {"weight"}:
            continue
        target, fused = route
        key = (original, int(module.weight.shape[-1]), float(module.eps), module.weight.dtype)
        if key not in verdicts:
            verdicts[key] = same_bits(module, fused)
            if not verdicts[key]:
                log.info("compiled norm differs for %s: left on MLX's norm", key)
        if verdicts[key]:
            module.__class__ = target
            routed += 1
    return routed


def same_bits(module: nn.Module, fused: Callable[[Any, mx.array], mx.array]) -> bool:
    """Whether `fused` gives `module`'s own call's bits on random probes within `MAX_ROWS`: one
    row, a batch of rows, a verify's rows, the most rows, per-head 4-D inputs and their
    transposed views (attention's per-head norms get those). Changes nothing; False if the
    compiled call fails."""
    width = int(module.weight.shape[-1])
    key = mx.random.key(11)
    probes = [
        mx.random.normal(shape, key=key) * 3.0
        for shape in ((1, 1, width), (4, 1, width), (1, 9, width), (2, 32, width), (64, width))
    ]
    probes += [
        mx.random.normal((1, 4, 7, width), key=key),
        mx.random.normal((1, 7, 4, width), key=key).transpose(0, 2, 1, 3),
    ]
    try:
        for x in probes:
            want, got = module(x), fused(module, x)
            if (
                want.shape != got.shape
                or not mx.array_equal(want.view(mx.uint32), got.view(mx.uint32)).item()
            ):
                return False
    except Exception:  # no compiler output, no temp dir: MLX's norm stays
        log.exception("compiled norm check failed: left on MLX's norm")
        return False
    return True
