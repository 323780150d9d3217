"""Attention for MLX on CPU: a softmax whose exp vectorizes for prefill steps, and a native
softmax product for decode steps, batches and speculative verifies.

MLX's CPU backend computes exp one element at a time (its SIMD layer has width 1 on x86), about
16 ns each here, and a long prefill's attention is mostly exps: on a 1400-token SmolLM2 prompt
the softmax took ~60% of the prefill. For prefill steps (`MIN_QUERY_ROWS`, `MIN_SCORES`) the exp
is the Cephes polynomial MLX itself uses (2^i from exponent bits times a degree-6 polynomial of
the fraction), written as plain arithmetic in one `mx.compile`d function, which MLX's CPU JIT
turns into a single C++ loop the compiler can vectorize: prefill 0.98-1.37x on the embedded
models at 512-2048 tokens, faster in 11 of 12 measurements (`benchmarks/prefill.py`, two runs;
its whole-array passes go to memory at 2048 keys, where MLX's row-by-row softmax stays in cache).
Everything else there is MLX's own fallback attention, op for op: grouped heads by broadcast, the
causal or given mask, a float32 softmax over each row.

Smaller calls (a decode step, a batch of them, a speculative verify, a short prefill step) take
the decode kernel's path where it is active (`ragcache.skinny_gemm`): the grouped query heads of
one key head become the rows of one product with the keys (read once for all of them, in
OpenBLAS's own order), and the softmax and the product with the values are one native call,
requested through MLX's `addmm` with the library's NaN alpha. At a 1000-token context MLX's
softmax alone took ~160 us a SmolLM2 layer. The native call also fixes the order of every sum
over the keys, so a masked key adds nothing: a position gets the same bits in a decode step, in a
speculative verify against the draft's later keys and behind a batch's left padding.

`install` routes a loaded model's attention layers here (their `__call__`, bound to this instead
of mlx-lm's `scaled_dot_product_attention`; nothing else in the process changes), on CPU only,
with each path where it is available. Cold and cached runs prefill in the same steps, so they
agree. A model's cache identity includes `tag()`, so KV computed one way is never restored into
a process computing it another way.
"""

from __future__ import annotations

import shutil
import threading
import types
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention as _ORIGINAL
from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache

from ragcache.skinny_gemm import SkinnyGemm

TAG = "attention=poly-exp-1"  # part of the cache identity of a model whose prefill uses it
DECODE_TAG = "decode-attention=native-1"  # ... and of one whose smaller calls use the native path
# A call takes the prefill path only with at least MIN_QUERY_ROWS queries per sequence and
# MIN_SCORES scores per sequence: a prefill step. Both depend only on the step's own length and
# context, so a cold run and a cached one (whose steps are aligned at the cache's capture points)
# choose alike; decode (1 row), batches of decodes and speculative verifies (at most 33 rows:
# max_draft <= 32) never take it (decode got ~10% slower with it) and go to the native path.
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


# The paths `configure` chose (process-wide, like the BLAS they run on): the prefill softmax,
# and the decode kernel whose softmax product smaller calls take (None: MLX's attention).
_prefill_exp = True
_decode_kernel: SkinnyGemm | None = None


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`: prefill steps (`MIN_QUERY_ROWS`, `MIN_SCORES`)
    computed as MLX's CPU fallback does but for the softmax, smaller float32 calls by the native
    softmax product. Quantized caches, attention sinks and paths not installed go to mlx-lm's
    own unchanged."""
    B, n_heads, L, D = queries.shape
    n_kv, S = keys.shape[1], keys.shape[-2]
    small = L < MIN_QUERY_ROWS or n_heads * L * S < MIN_SCORES
    if sinks is not None or hasattr(cache, "bits"):
        return _ORIGINAL(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    if small:
        floats = queries.dtype == keys.dtype == values.dtype == mx.float32
        kernel = _decode_kernel
        first = _oldest_key(cache, L, S)
        if kernel is None or not floats or first >= kernel.softmax_first_limit:
            return _ORIGINAL(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        alpha = kernel.softmax_alpha_from(first)
        return softmax_product_attention(queries, keys, values, scale, mask, alpha)
    if not _prefill_exp:
        return _ORIGINAL(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    repeats = n_heads // n_kv
    q, k, v = queries * mx.array(scale, queries.dtype), keys, values
    if repeats > 1:
        q = q.reshape(B, n_kv, repeats, L, D)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = _masked(q @ k.swapaxes(-1, -2), mask, n_kv, repeats, L, S)
    out = softmax_rows(scores) @ v
    return out.reshape(B, n_heads, L, values.shape[-1]) if repeats > 1 else out


def _masked(scores: mx.array, mask: Any, n_kv: int, repeats: int, L: int, S: int) -> mx.array:
    """`scores` with mlx-lm's `mask` applied as MLX's fallback applies it: "causal" as a boolean
    mask; a per-sequence or per-head mask laid out as grouped scores (B, n_kv, repeats, L, S)
    without a copy; False gives the lowest float, a float mask is added."""
    if isinstance(mask, str):  # "causal": query i sees keys up to its own position
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    elif mask is not None and scores.ndim == 5 and mask.ndim >= 3:
        if mask.shape[-3] == 1:
            mask = mx.expand_dims(mask, -3)
        else:
            mask = mask.reshape(*mask.shape[:-3], n_kv, repeats, *mask.shape[-2:])
    if mask is None:
        return scores
    if mask.dtype == mx.bool_:
        lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        return mx.where(mask, scores, lowest)
    return scores + mask.astype(scores.dtype)


def _oldest_key(cache: Any, L: int, S: int) -> int:
    """Where the oldest of the keys a one-token step attends to stands: 0, but for a sliding
    window that has wrapped (mlx-lm's `RotatingKVCache` writes a decode step's key over its
    oldest, so the buffer is a ring whose oldest key follows the newest). A multi-token step's
    keys come in temporal order (mlx-lm's concat path)."""
    if L != 1:
        return 0
    if isinstance(cache, BatchRotatingKVCache):  # a batch's ring: wrapped once `rotated`
        return int(cache._idx) % S if cache.rotated and cache.max_size == S else 0
    if not isinstance(cache, RotatingKVCache) or cache.keep != 0:
        return 0
    if not isinstance(cache.offset, int) or cache.offset <= cache.max_size or cache.max_size != S:
        return 0
    return int(cache._idx) % S


def softmax_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: Any,
    softmax_alpha: float,
) -> mx.array:
    """Attention through the decode kernel: the query heads sharing a key head are the rows of
    one product with the keys, and softmax(scores) times the values is one native call (MLX's
    `addmm` with the kernel's NaN alpha, which only that library's cblas_sgemm understands)."""
    B, n_heads, L, D = queries.shape
    n_kv, S = keys.shape[1], keys.shape[-2]
    repeats = n_heads // n_kv
    # Rows (repeat, position) of each key head: a reshape, no copy for contiguous queries.
    q = (queries * mx.array(scale, queries.dtype)).reshape(B, n_kv, repeats * L, D)
    scores = q @ keys.swapaxes(-1, -2)
    if mask is not None:  # applied to the scores grouped by query head, then back to rows
        grouped = _masked(scores.reshape(B, n_kv, repeats, L, S), mask, n_kv, repeats, L, S)
        scores = grouped.reshape(B, n_kv, repeats * L, S)
    zero = mx.array(0.0, values.dtype)
    out = mx.addmm(zero, scores, values, alpha=softmax_alpha, beta=0.0)
    return out.reshape(B, n_heads, L, values.shape[-1])


def available() -> tuple[bool, str]:
    """Whether `install` would put the prefill softmax in, and why (not)."""
    if mx.default_device().type != mx.cpu:
        return False, "not on the CPU: MLX's own attention kernel is used"
    if shutil.which("g++") is None:  # MLX's CPU JIT runs g++; without it nothing fuses
        return False, "no g++ for MLX's CPU compiler: MLX's own softmax is used"
    return True, "softmax with a vectorized exp (ragcache.attention)"


def decode_available(kernel: SkinnyGemm | None) -> tuple[bool, str]:
    """Whether the native softmax product can serve smaller calls, and why (not): the decode
    kernel is active and MLX's matmuls reach it (a small product checked bit for bit)."""
    if mx.default_device().type != mx.cpu:
        return False, "not on the CPU: MLX's own attention kernel is used"
    if kernel is None:
        return False, "the decode kernel is off: MLX's attention"
    rng = np.random.default_rng(0)
    zero = mx.array(0.0)
    # Rows as a decode step (1), grouped heads (3); values whole and sliced out of a longer
    # buffer (a cache's keys so far); sums from the first key and from a ring's seventh.
    for rows, first in ((1, 0), (3, 0), (3, 7)):
        scores = rng.standard_normal((2, rows, 40), dtype=np.float32)
        buffer = rng.standard_normal((2, 64, 24), dtype=np.float32)
        for values in (mx.array(buffer[:, :40]), mx.array(buffer)[:, :40]):
            alpha = kernel.softmax_alpha_from(first)
            mine = mx.addmm(zero, mx.array(scores), values, alpha=alpha, beta=0.0)
            expected = np.stack(
                [kernel.softmax_product(scores[i], buffer[i, :40], first) for i in range(2)]
            )
            if not np.array_equal(np.array(mine).view(np.uint32), expected.view(np.uint32)):
                return False, "MLX's matmuls do not reach the decode kernel: MLX's attention"
    return True, "softmax product in the decode kernel (ragcache.attention)"


def configure(prefill: bool, kernel: SkinnyGemm | None) -> None:
    """Choose the paths routed attention takes, for the whole process (as the BLAS they run on):
    prefill steps through the vectorized softmax (`prefill`, where `available`), smaller calls
    through `kernel`'s softmax product (where `decode_available`)."""
    global _prefill_exp, _decode_kernel
    _prefill_exp = prefill and available()[0]
    _decode_kernel = kernel if kernel and decode_available(kernel)[0] else None


def install(model: Any) -> None:
    """Route the attention of `model`'s layers here, when a path is configured.

    Changes only this model: each layer whose `__call__` calls mlx-lm's module-level
    `scaled_dot_product_attention` gets a subclass whose `__call__` is the same code bound to
    this one (other models and plain mlx-lm in the process are untouched).
    """
    if not _prefill_exp and _decode_kernel is None:
        return
    for layer in model.modules():
        routed = _routed_class(type(layer))
        if routed is not None:
            layer.__class__ = routed


def routes(model: Any) -> bool:
    """Whether `model`'s attention runs here (its cache identity must then say so)."""
    return any(type(layer) in _ROUTED.values() for layer in model.modules())


def tag() -> str:
    """The cache identity's part for the paths installed."""
    parts = [TAG] if _prefill_exp else []
    return "+".join(parts + ([DECODE_TAG] if _decode_kernel is not None else []))


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
