"""Attention for MLX on CPU, with a softmax whose exp vectorizes.

MLX's CPU backend computes exp one element at a time (its SIMD layer has width 1 on x86), about
16 ns each here, and a long prefill's attention is mostly exps: on a 1400-token SmolLM2 prompt
the softmax took ~60% of the prefill. Here the exp is the Cephes polynomial MLX itself uses (2^i
from exponent bits times a degree-6 polynomial of the fraction), written as plain arithmetic in
one `mx.compile`d function, which MLX's CPU JIT turns into a single C++ loop the compiler can
vectorize: prefill 0.98-1.37x on the embedded models at 512-2048 tokens, faster in 11 of 12
measurements (`benchmarks/prefill.py`, two runs; its whole-array passes go to memory at 2048
keys, where MLX's row-by-row softmax stays in cache). Everything else is MLX's own fallback
attention, op for op: grouped heads by broadcast, the causal or given mask, a float32 softmax
over each row.

`install` routes a loaded model's attention layers here (their `__call__`, bound to this instead
of mlx-lm's `scaled_dot_product_attention`; nothing else in the process changes), on CPU only
and only where MLX's JIT has a C++ compiler. Every prefill step takes it (cold and cached runs
prefill in the same steps, so they agree); decode, batches and speculative verifies keep MLX's
attention bit for bit. A model's cache identity includes `TAG`, so KV computed one way is never
restored into a process computing it the other way.
"""

from __future__ import annotations

import shutil
import threading
import types
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention as _ORIGINAL

TAG = "attention=poly-exp-1"  # part of the cache identity of a model that uses it
# A call takes this path only with at least MIN_QUERY_ROWS queries per sequence and MIN_SCORES
# scores per sequence: a prefill step. Both depend only on the step's own length and context, so
# a cold run and a cached one (whose steps are aligned at the cache's capture points) choose alike;
# decode (1 row), batches of decodes and speculative verifies (at most 33 rows: max_draft <= 32)
# always keep MLX's attention, and small calls gain nothing (decode got ~10% slower with it).
MIN_QUERY_ROWS = 64
MIN_SCORES = 1 << 18

_ROUND = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds a float to an integer
_LOG2E = 1.4426950408889634
# exp(x) = 2^(x log2 e) = 2^whole * 2^frac, 2^frac by Cephes' polynomial (as MLX's simd::exp)
_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)


def _exp_parts(shifted: mx.array) -> tuple[mx.array, mx.array]:
    """For x <= 0: the polynomial of the fraction, and 2^whole as float32 bits. Below 2^-126
    (masked scores) it gives 2^-126 instead of 0: nothing next to a row maximum's 1."""
    x = mx.maximum(shifted * _LOG2E, -126.0)
    whole = (x + _ROUND) - _ROUND
    frac = x - whole
    poly = frac * _POLY[0] + _POLY[1]
    for c in _POLY[2:]:
        poly = poly * frac + c
    return poly, mx.left_shift(whole.astype(mx.int32) + 127, 23)


# Traced once per input shape: a shapeless trace ran 2-3x slower on shapes other than its first
# (measured, MLX 0.32). Prefill calls have few shapes (512-row steps against the context so far).
_exp_parts_compiled = mx.compile(_exp_parts)


def softmax_rows(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32, returned in the scores' dtype."""
    x = scores if scores.dtype == mx.float32 else scores.astype(mx.float32)
    poly, bits = _exp_parts_compiled(x - mx.max(x, axis=-1, keepdims=True))
    e = poly * bits.view(mx.float32)
    p = e / mx.sum(e, axis=-1, keepdims=True)
    return p if p.dtype == scores.dtype else p.astype(scores.dtype)


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`, computed as MLX's CPU fallback does but for the
    softmax, for prefill steps (`MIN_QUERY_ROWS`, `MIN_SCORES`). Decode steps, batches of them,
    speculative verifies, quantized caches and attention sinks go to mlx-lm's own unchanged."""
    B, n_heads, L, D = queries.shape
    n_kv, S = keys.shape[1], keys.shape[-2]
    small = L < MIN_QUERY_ROWS or n_heads * L * S < MIN_SCORES
    if small or sinks is not None or hasattr(cache, "bits"):
        return _ORIGINAL(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    repeats = n_heads // n_kv
    q, k, v = queries * mx.array(scale, queries.dtype), keys, values
    if repeats > 1:
        q = q.reshape(B, n_kv, repeats, L, D)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ k.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal": query i sees keys up to its own position
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    elif mask is not None and repeats > 1 and mask.ndim >= 3:  # as MLX's fallback: no copy
        if mask.shape[-3] == 1:
            mask = mx.expand_dims(mask, -3)
        else:
            mask = mask.reshape(*mask.shape[:-3], n_kv, repeats, L, S)
    if mask is not None:
        if mask.dtype == mx.bool_:
            lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
            scores = mx.where(mask, scores, lowest)
        else:
            scores = scores + mask.astype(scores.dtype)
    out = softmax_rows(scores) @ v
    return out.reshape(B, n_heads, L, values.shape[-1]) if repeats > 1 else out


def available() -> tuple[bool, str]:
    """Whether `install` would put it in, and why (not)."""
    if mx.default_device().type != mx.cpu:
        return False, "not on the CPU: MLX's own attention kernel is used"
    if shutil.which("g++") is None:  # MLX's CPU JIT runs g++; without it nothing fuses
        return False, "no g++ for MLX's CPU compiler: MLX's own softmax is used"
    return True, "softmax with a vectorized exp (ragcache.attention)"


def install(model: Any) -> None:
    """Route the attention of `model`'s layers here, where `available`.

    Changes only this model: each layer whose `__call__` calls mlx-lm's module-level
    `scaled_dot_product_attention` gets a subclass whose `__call__` is the same code bound to
    this one (other models and plain mlx-lm in the process are untouched).
    """
    if not available()[0]:
        return
    for layer in model.modules():
        routed = _routed_class(type(layer))
        if routed is not None:
            layer.__class__ = routed


def routes(model: Any) -> bool:
    """Whether `model`'s attention runs here (its cache identity must then say so)."""
    return any(type(layer) in _ROUTED.values() for layer in model.modules())


_NAME = "scaled_dot_product_attention"
_ROUTED: dict[type, type] = {}  # mlx-lm's class -> its routed subclass
_ROUTING = threading.Lock()  # two models loading at once must share one subclass per class


def _routed_class(cls: type) -> type | None:
    """`cls`'s routed subclass (made on first use), `cls` itself if it is one, or None when its
    `__call__` does not use mlx-lm's attention."""
    with _ROUTING:
        if cls in _ROUTED.values():
            return cls
        if cls not in _ROUTED:
            call = cls.__call__
            code = getattr(call, "__code__", None)
            if (
                code is None
                or _NAME not in code.co_names
                or call.__globals__.get(_NAME) is not _ORIGINAL
            ):
                return None
            # A snapshot of the module's globals: later rebinding of a module global is not seen.
            namespace = dict(call.__globals__, **{_NAME: attention})
            rebound = types.FunctionType(
                code, namespace, call.__name__, call.__defaults__, call.__closure__
            )
            rebound.__kwdefaults__ = call.__kwdefaults__
            _ROUTED[cls] = type(
                cls.__name__, (cls,), {"__call__": rebound, "__module__": cls.__module__}
            )
        return _ROUTED[cls]
