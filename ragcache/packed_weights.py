"""A loaded model's weights, packed for decode: each one-row product streams at memory speed.

A decode step reads every weight matrix once for one row of activations. Read row-major, eight
weight rows at a time with scalar FMA chains (the order that gives a decode row its prefill's
bits), the decode kernel (`ragcache.skinny_gemm`) moved ~10 GB/s here; read from a copy packed
as blocks of 16 output rows with their inputs interleaved, the same FMA chains run 16 lanes wide
at ~30 GB/s per thread. The bits stay the ones OpenBLAS gives the row in a prefill (each lane does
the same operations in the same order, and every shape's first call is still checked against
the reference product). Small batches and speculative verifies (up to 8 rows) read a packed
weight once for all their rows.

The cost is memory: a second copy of every packed weight (the prefill's OpenBLAS reads the
original), as much again as the float32 model. `RAGCACHE_PACKED_WEIGHTS=0` turns it off.

A weight whose values are exactly 4-bit codes times a scale plus an offset (one dequantized from
a GGUF's Q4_1 blocks: SmolLM2's layers) is registered as those codes instead
(`ragcache.q4_weights`): ~0.75 bytes a weight for the decode step to read, and a copy a fifth of
the float one, with the same bits. `RAGCACHE_Q4_WEIGHTS=0` keeps float copies for all.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ragcache.q4_weights import find_codes, kernel_layout
from ragcache.skinny_gemm import SkinnyGemm


@dataclass
class PackedWeights:
    """What was packed for one model; the copies are dropped when the model is collected."""

    matrices: int
    bytes: int
    q4_matrices: int = 0  # of them, held as exact 4-bit codes


def decode_weights(model: nn.Module) -> list[mx.array]:
    """The weights a decode step multiplies a row by: every float32 Linear's, and the embedding
    table when it doubles as the output layer (no Linear has the vocabulary's size)."""
    linears: list[mx.array] = []
    embeddings: list[mx.array] = []
    for _, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, mx.array) or weight.ndim != 2 or weight.dtype != mx.float32:
            continue
        if isinstance(module, nn.Linear):
            if "bias" not in module:  # with a bias MLX adds in the product (beta 1): not taken
                linears.append(weight)
        elif isinstance(module, nn.Embedding):
            embeddings.append(weight)
    rows = {w.shape[0] for w in linears}
    tied = [e for e in embeddings if e.shape[0] not in rows]
    # The kernel takes products whose output count is a multiple of 8 (native/skinny_gemm.c).
    return [w for w in linears + tied if w.shape[0] % 8 == 0]


def pack_model(model: nn.Module, kernel: SkinnyGemm, q4: bool = True) -> PackedWeights:
    """Pack `model`'s decode weights in `kernel`; unpacked again when `model` is collected.
    `q4`: a weight that is exactly 4-bit codes is registered as those (ragcache.q4_weights)."""
    mx.eval(model.parameters())
    kept: list[Any] = []  # the weights themselves: their memory must not be reused while packed
    addresses: list[int] = []
    # Set up before the first copy, so a failure half-way still unregisters what was packed.
    weakref.finalize(model, _unpack, kernel, addresses, kept, os.getpid())
    total = q4_matrices = 0
    for weight in decode_weights(model):
        view = np.array(weight, copy=False)  # the array's own memory, as sgemm is given it
        if not view.flags["C_CONTIGUOUS"]:
            continue
        n, k = weight.shape
        kept.append(weight)
        addresses.append(view.ctypes.data)
        codes = find_codes(view) if q4 else None
        if codes is not None:
            layout = kernel_layout(codes)
            if kernel.pack_q4(view.ctypes.data, n, k, layout):
                total += layout.nbytes
                q4_matrices += 1
                continue
        if kernel.pack(view.ctypes.data, n, k):
            total += (n + 15) // 16 * 16 * k * 4
    return PackedWeights(len(addresses), total, q4_matrices)


def _unpack(kernel: SkinnyGemm, addresses: list[int], kept: list[Any], pid: int) -> None:
    if os.getpid() != pid:  # a forked child: MLX cannot run there, nor is its copy anyone's
        return
    mx.synchronize()  # no product still queued reads a copy about to be freed
    for address in addresses:
        kernel.unpack(address)
    kept.clear()
