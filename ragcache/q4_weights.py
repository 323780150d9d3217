"""Exact 4-bit codes for weights that came from a GGUF's 4-bit blocks: decode reads ~5x fewer bytes.

The embedded models are converted from 4-bit GGUFs to float32 (MLX's fast path on CPU). SmolLM2's
layer weights are Q4_1 blocks there: every float32 weight is `d * q + m`, computed in float32, for
a 4-bit `q` and two values per row and 32 inputs. So the float32 matrix, 4 bytes a weight, holds
no more than ~0.75 bytes a weight of information, and a decode step, which reads every weight
once for one row, reads 5.3x more memory than it needs.

This module finds those codes back from the float32 weight alone (no GGUF needed: a model folder
converted the same way qualifies, one that was not simply keeps its float copy): per row and 32
inputs, the offset is the block's smallest value (its code is 0), the scale the float16 nearest
to (largest - smallest) / 15 (or a neighbour of it), each code the nearest integer; then every
weight is rebuilt with the float32 multiply and add the decode kernel uses, and only a matrix
that rebuilds bit for bit is given to the kernel (`ragcache.skinny_gemm`, `native/skinny_gemm.c`
q4_rows), which checks that again in its own arithmetic. Other 4-bit GGUF formats whose scales
are not float16 (Q4_K: a float16 times a 6-bit sub-scale) are not searched, and keep float
copies. The kernel rebuilds each weight in registers and runs the same FMA chains as on the
float copy, so a decode step has the same bits, and cached, speculative and cold greedy runs
stay token for token the same. Prefills keep reading the float32 weights through OpenBLAS.

Measured on SmolLM2-135M's shapes (AMD EPYC, one thread, weights streamed from memory): a
46080 x 576 product (30 layers' 1536 x 576 gate weights stacked) took 1.95 ms read from codes
against 4.73 ms from the packed float copy (2.4x), with the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32  # inputs per scale and offset (native/skinny_gemm.c: Q4_GROUP)
ROWS = 16  # output rows per block of the layout (one AVX2 vector pair)
MAX_CODE = 15
# Bytes per block of ROWS rows and GROUP inputs in the kernel's layout: ROWS scales and ROWS
# offsets (float32), then GROUP inputs of ROWS 4-bit codes (native/skinny_gemm.c Q4_GROUP_BYTES).
GROUP_BYTES = ROWS * 4 * 2 + GROUP * ROWS // 2
# Scale candidates tried, in float16 steps from the nearest (up to two either way, never below
# zero): a block's largest value was rounded once when it was made (d*15 + m), so the scale it
# came from is the nearest float16 or one next to it.
_SCALE_STEPS = (0, 1, -1, 2, -2)
_CHUNK = 1 << 16  # weights searched at a time
_MAX_SPAN = np.float32(MAX_CODE * 65504.0)  # 15 times float16's largest finite value


@dataclass(frozen=True)
class Q4Codes:
    """A weight (n x k) as `scale * code + offset`, per row and GROUP inputs."""

    scale: np.ndarray  # (n, k // GROUP) float32
    offset: np.ndarray  # (n, k // GROUP) float32
    codes: np.ndarray  # (n, k) uint8, each 0 .. 15

    def rebuild(self) -> np.ndarray:
        """The float32 weight, computed as the kernel does: one multiply, then one add."""
        n, k = self.codes.shape
        q = self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
        product = q * self.scale[..., None]  # two float32 operations, never fused by numpy
        return (product + self.offset[..., None]).reshape(n, k)


def find_codes(weight: np.ndarray) -> Q4Codes | None:
    """The exact 4-bit codes of a float32 weight (n x k, k a multiple of GROUP), or None when any
    block of it is not `scale * q + offset` for 4-bit q (then it keeps its float copy)."""
    if weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[1] % GROUP:
        return None
    n, k = weight.shape
    scale = np.empty((n, k // GROUP), np.float32)
    offset = np.empty_like(scale)
    codes = np.empty((n, k), np.uint8)
    # A few rows at a time: the temporaries stay in cache (over the whole matrix at once, numpy's
    # page faults on fresh temporaries took more time than the arithmetic).
    step = max(1, _CHUNK // k)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        # Overflow and NaN only arise in candidates that are then refused.
        with np.errstate(over="ignore", invalid="ignore"):
            if not _find_rows(weight[rows], scale[rows], offset[rows], codes[rows]):
                return None
    return Q4Codes(scale, offset, codes)


def _find_rows(
    weight: np.ndarray, scale: np.ndarray, offset: np.ndarray, codes: np.ndarray
) -> bool:
    """find_codes over some rows, into `scale`, `offset` and `codes`; False: not exact codes."""
    blocks = weight.reshape(weight.shape[0], -1, GROUP)
    if not np.isfinite(blocks).all():
        return False
    np.min(blocks, axis=-1, out=offset)
    span = blocks.max(axis=-1) - offset
    if not (span <= _MAX_SPAN).all():  # a float16 scale could not hold it (nor NaN a code)
        return False
    nearest = (span / np.float32(MAX_CODE)).astype(np.float16)
    # Every block at once with the nearest scale (almost all are exact with it), then the
    # blocks left over with its neighbours.
    scale[...] = nearest
    q = _codes_for(blocks, scale, offset)
    block_codes = codes.reshape(blocks.shape)
    block_codes[...] = q
    todo = ~_same_bits(q * scale[..., None] + offset[..., None], blocks)
    for steps in _SCALE_STEPS[1:]:
        rows, groups = np.nonzero(todo)
        if rows.size == 0:
            break
        s = _step(nearest[rows, groups], steps).astype(np.float32)
        keep = ~np.signbit(s)  # a Q4_1 scale is never negative
        rows, groups, s = rows[keep], groups[keep], s[keep]
        values = blocks[rows, groups]
        o = offset[rows, groups]
        q = _codes_for(values, s, o)
        exact = _same_bits(q * s[:, None] + o[:, None], values)
        scale[rows[exact], groups[exact]] = s[exact]
        block_codes[rows[exact], groups[exact]] = q[exact]
        todo[rows[exact], groups[exact]] = False
    return not todo.any()


def _same_bits(rebuilt: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per block (last axis), whether every rebuilt weight has the value's bits (so -0.0 is not
    taken for 0.0)."""
    return (rebuilt.view(np.uint32) == values.view(np.uint32)).all(axis=-1)


def _codes_for(values: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The nearest codes (as float32) of `values` (..., GROUP) for a scale and offset each."""
    safe = np.where(scale == 0, np.float32(1), scale)[..., None]
    q = np.rint((values - offset[..., None]) / safe)
    return np.clip(q, 0, MAX_CODE, out=q)


def _step(values: np.ndarray, steps: int) -> np.ndarray:
    out = values
    toward = np.float16(np.inf) if steps > 0 else np.float16(-np.inf)
    for _ in range(abs(steps)):
        out = np.nextafter(out, toward)
    return out


def layout_bytes(n: int, k: int) -> int:
    """The size of an n x k weight's codes in the kernel's layout (the last block padded)."""
    return -(-n // ROWS) * (k // GROUP) * GROUP_BYTES


def kernel_layout(found: Q4Codes) -> np.ndarray:
    """The bytes `skinny_gemm_pack_q4` takes: per block of 16 rows (the last padded with zero
    rows), per GROUP inputs, 16 scales, 16 offsets, then per input 8 bytes, byte i holding row
    i's code in its low nibble and row i+8's in its high one."""
    n, k = found.codes.shape
    blocks, groups = -(-n // ROWS), k // GROUP
    pad = blocks * ROWS - n

    def padded(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) if pad else a

    codes = padded(found.codes).reshape(blocks, ROWS, groups, GROUP)
    packed = codes[:, : ROWS // 2] | (codes[:, ROWS // 2 :] << 4)  # (blocks, 8, groups, GROUP)
    packed = packed.transpose(0, 2, 3, 1).reshape(blocks, groups, GROUP * ROWS // 2)

    def per_group(a: np.ndarray) -> np.ndarray:  # (n, groups) -> (blocks, groups, 64 bytes)
        a = padded(a).reshape(blocks, ROWS, groups).transpose(0, 2, 1)
        return np.ascontiguousarray(a, dtype=np.float32).view(np.uint8)

    layout = np.concatenate([per_group(found.scale), per_group(found.offset), packed], axis=-1)
    return np.ascontiguousarray(layout).reshape(-1)
