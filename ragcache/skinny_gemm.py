"""Decode steps' matmuls at memory speed, with the bits of a prefill's rows.

A decode step multiplies one row (a batch: a few rows) by every weight matrix. MLX's CPU backend
hands each of those to `cblas_sgemm`. OpenBLAS 0.3.21 then either packs the whole weight into a
scratch copy on every such call before its kernel reads it (on an Intel machine the output layer
of SmolLM2, 49152 x 576, took 21 ms that way against 8.5 ms as a matrix-vector product), or, in
its SkylakeX build, sends small products to a small-matrix kernel that sums in another order than
its ordinary path. ragcache's promise is that cached, speculative and cold greedy runs give the
same tokens: a decode row must have the same bits as that row computed inside a prefill or a
speculative verify (many rows, OpenBLAS's ordinary sgemm). So `native/skinny_gemm.c` computes
one-row products, and small ones (m*n*k <= 100^3) of up to 8 rows, in the ordinary path's own
order (an FMA chain per output, restarted at each of sgemm's K blocks) on two threads, and takes
only calls where that is proven:

- the K block is found by probing this machine's OpenBLAS (bit-for-bit on several K, against a
  product tall enough for its ordinary path);
- OpenBLAS must give a row the same bits in products of different heights, or nothing can match
  it and the kernel stays off (seen: Haswell kernels forced onto an AVX-512 AMD machine);
- every new (n, k) shape is computed both ways on its first call; one that differs in any bit is
  computed through the padded reference product from then on;
- products over at most 256 inputs with up to 256 rows are taken too, in the same order and
  under the same checks: attention's scores (the query heads of one key head times the keys,
  k the head size, n the context), so a decode step's and a verify's agree;
- everything else (prefill, any other caller) goes to OpenBLAS unchanged.

The library also computes attention's softmax product for `ragcache.attention` (softmax of the
scores times the values, in one call that MLX's `addmm` requests with a NaN alpha): its sums
over the keys run in one order in which a masked key adds nothing, so a position gets the same
bits in a decode step, a verify and a padded batch.

A loaded model's float32 weights are also registered with the kernel (`ragcache.packed_weights`):
it keeps a copy of each packed as blocks of 16 output rows with their inputs interleaved, which
one-row products read with one vector FMA per input for 16 outputs (~3x the row-major rate), in
the same order, so with the same bits. Products of up to 8 rows over a packed weight are taken
at any size (a speculative verify over the output layer): the weight is read once for all rows.

The library is compiled once per source version with the system C compiler into
`$RAGCACHE_HOME/native/` and loaded RTLD_GLOBAL before OpenBLAS and mlx.core, so libmlx binds its
`cblas_sgemm` to it (`ragcache.blas`). No compiler, no AVX2/FMA, or a probe that never matches:
it stays off and says why (`ragcache doctor`); RAGCACHE_SKINNY_GEMM=0 turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used: this module loads before mlx and numpy
    import numpy as np

SOURCE = Path(__file__).with_name("native") / "skinny_gemm.c"
# Included by SOURCE: part of what the built library's name hashes.
INCLUDED = (Path(__file__).with_name("native") / "output_screen.c",)
# OpenBLAS K blocks (GEMM_Q) and split roundings to try, most likely first (Haswell sgemm: 320,
# SkylakeX: 448).
_BLOCKS = (320, 384, 256, 512, 448, 640, 768, 192, 128)
_UNROLLS = (4, 8, 16, 2, 1, 24, 32)
_PROBE_K = (576, 896, 1536, 2048, 4864)  # one and several K blocks, and split remainders
_PROBE_N = 256
MAX_ROWS = 8  # the most rows a product over a weight the kernel takes has (native: MAX_ROWS)


@dataclass(frozen=True)
class SkinnyStatus:
    active: bool
    reason: str  # one line: why it is on or off
    k_block: int = 0
    threads: int = 0
    library: str = ""


class SkinnyGemm:
    """The loaded library: its probe, its switch and its counters."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self._lib = lib
        self.path = path
        self.blocking: tuple[int, int] | None = None  # sgemm's (K block, split rounding) found
        self.threads = 1
        p = ctypes.c_void_p
        i = ctypes.c_int
        lib.skinny_gemm_bind.argtypes = [ctypes.c_char_p]
        lib.skinny_gemm_configure.argtypes = [i, i, i, i]
        lib.skinny_gemm_configure.restype = None
        lib.skinny_gemm_compute.argtypes = [i, i, i, p, p, p]
        lib.skinny_gemm_compute.restype = None
        lib.skinny_gemm_reference.argtypes = [i, i, i, p, p, p]
        lib.skinny_gemm_reference.restype = i
        lib.skinny_gemm_openblas.argtypes = [i, i, i, p, p, p]
        lib.skinny_gemm_openblas.restype = None
        lib.skinny_gemm_reference_only.argtypes = [i]
        lib.skinny_gemm_reference_only.restype = None
        lib.skinny_gemm_counter.argtypes = [i]
        lib.skinny_gemm_counter.restype = ctypes.c_long
        lib.skinny_gemm_pack.argtypes = [p, i, i, i]
        lib.skinny_gemm_pack.restype = i
        lib.skinny_gemm_pack_q4.argtypes = [p, i, i, i, p]
        lib.skinny_gemm_pack_q4.restype = i
        lib.skinny_gemm_unpack.argtypes = [p]
        lib.skinny_gemm_unpack.restype = None
        lib.skinny_gemm_packed_bytes.argtypes = []
        lib.skinny_gemm_packed_bytes.restype = ctypes.c_long
        lib.skinny_gemm_softmax_product.argtypes = [i, i, i, i, p, p, p]
        lib.skinny_gemm_softmax_product.restype = i
        lib.skinny_gemm_softmax_alpha.argtypes = [i]
        lib.skinny_gemm_softmax_alpha.restype = ctypes.c_float
        lib.skinny_gemm_softmax_first_limit.argtypes = []
        lib.skinny_gemm_softmax_first_limit.restype = i
        self.softmax_first_limit = int(lib.skinny_gemm_softmax_first_limit())
        lib.skinny_gemm_screen.argtypes = [p, i, i, i]
        lib.skinny_gemm_screen.restype = i
        lib.skinny_gemm_screen_alpha.argtypes = []
        lib.skinny_gemm_screen_alpha.restype = ctypes.c_float
        # The alpha (a NaN) that asks for a greedy step's screened output product.
        self.screen_alpha = float(lib.skinny_gemm_screen_alpha())
        # The alphas that ask this library's cblas_sgemm for softmax(A) B (NaNs; see the C),
        # by the key their sums start from; extended under the lock (ctypes drops the GIL).
        self._softmax_alphas = [float(lib.skinny_gemm_softmax_alpha(0))]
        self._alphas_lock = threading.Lock()

    def bind(self, openblas: str) -> bool:
        return int(self._lib.skinny_gemm_bind(openblas.encode())) == 0

    def configure(self, on: bool, k_block: int, unroll: int, threads: int) -> None:
        self._lib.skinny_gemm_configure(int(on), k_block, unroll, threads)

    def set_enabled(self, on: bool) -> None:
        """Route one-row calls here (with the blocking found) or leave every call to OpenBLAS."""
        if self.blocking is None:
            raise RuntimeError("the kernel was never activated")
        self.configure(on, *self.blocking, self.threads)

    def set_reference_only(self, on: bool) -> None:
        """Compute the calls this kernel takes through the padded OpenBLAS product instead: the
        bits it must reproduce, slower (for tests)."""
        self._lib.skinny_gemm_reference_only(int(on))

    def pack(self, address: int, n: int, k: int) -> bool:
        """Register the row-major n x k float32 weight at `address` for one-row products read
        through a packed copy (native/skinny_gemm.c). The caller keeps the weight alive and
        unchanged until `unpack`. False: no memory or the table is full (the weight is then
        read as it is)."""
        return int(self._lib.skinny_gemm_pack(ctypes.c_void_p(address), n, k, k)) == 0

    def pack_q4(self, address: int, n: int, k: int, layout: np.ndarray) -> bool:
        """Register the n x k float32 weight at `address` as exact 4-bit codes: `layout`, the
        uint8 array `ragcache.q4_weights.kernel_layout` makes (copied here). One-row products then
        read the codes instead of the floats, with the same bits. False: the codes do not rebuild
        the weight bit for bit (checked here), no memory, the table is full, or k is not a
        multiple of 32."""
        import numpy as np

        from ragcache.q4_weights import layout_bytes

        expected = layout_bytes(n, k)
        if layout.dtype != np.uint8 or layout.size != expected:
            raise ValueError(f"a {n} x {k} weight's codes are {expected} bytes, not {layout.size}")
        layout = np.ascontiguousarray(layout)
        codes = ctypes.c_void_p(layout.ctypes.data)
        return int(self._lib.skinny_gemm_pack_q4(ctypes.c_void_p(address), n, k, k, codes)) == 0

    def screen(self, address: int, n: int, k: int) -> bool:
        """Give the packed weight at `address` (n x k) an 8-bit screen, so that a greedy step's
        output product (alpha `screen_alpha`) reads it instead of the whole weight
        (native/output_screen.c); dropped with the packed copy. False: not packed, no memory, or
        a weight that is not finite."""
        return int(self._lib.skinny_gemm_screen(ctypes.c_void_p(address), n, k, k)) == 0

    def unpack(self, address: int) -> None:
        """Drop the packed copy of the weight at `address`, once no product is reading it."""
        self._lib.skinny_gemm_unpack(ctypes.c_void_p(address))

    def packed_bytes(self) -> int:
        """Memory held by packed copies of weights."""
        return int(self._lib.skinny_gemm_packed_bytes())

    def _operands(self, m: int, n: int, k: int, seed: int) -> tuple[Any, Any]:
        import numpy as np

        rng = np.random.default_rng(seed + 7919 * k + n + 104729 * m)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)
        return a, b

    def _product(self, fn: Any, a: Any, b: Any) -> Any:
        import numpy as np

        out = np.empty((a.shape[0], b.shape[0]), np.float32)
        ptr = ctypes.c_void_p
        done = fn(
            a.shape[0],
            b.shape[0],
            a.shape[1],
            ptr(a.ctypes.data),
            ptr(b.ctypes.data),
            ptr(out.ctypes.data),
        )
        if done == 0:  # the reference could not allocate its scratch product
            raise MemoryError("no memory for the reference product")
        return out

    def product(self, a: Any, b: Any) -> Any:
        """This kernel's a @ b.T for float32 numpy rows `a` (m x k) and `b` (n x k), computed as
        a decode step's product is (from b's packed copy if b's memory is registered)."""
        return self._product(self._lib.skinny_gemm_compute, a, b)

    @property
    def softmax_alpha(self) -> float:
        """The alpha (a NaN) with which MLX's addmm(0, A, B) gets softmax(A) B from here."""
        return self._softmax_alphas[0]

    def softmax_alpha_from(self, first: int) -> float:
        """The alpha for softmax(A) B with the sums over the keys taken from key `first` round
        (a wrapped sliding window's oldest key), 0 <= first < `softmax_first_limit`."""
        if not 0 <= first < self.softmax_first_limit:
            raise ValueError(f"first key {first} outside [0, {self.softmax_first_limit})")
        alphas = self._softmax_alphas
        if first >= len(alphas):  # memo: one C call per key position
            with self._alphas_lock:
                while len(alphas) <= first:
                    alphas.append(float(self._lib.skinny_gemm_softmax_alpha(len(alphas))))
        return alphas[first]

    def softmax_product(self, a: Any, b: Any, first: int = 0) -> Any:
        """softmax(a) @ b for float32 numpy scores `a` (m x k) and values `b` (k x n), its sums
        from key `first` round, as attention's calls get it from this library
        (`ragcache.attention`)."""
        import numpy as np

        a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or 0 in a.shape + b.shape:
            raise ValueError(f"softmax_product: shapes {a.shape} and {b.shape} do not chain")
        if not 0 <= first < a.shape[1]:
            raise ValueError(f"softmax_product: first key {first} outside [0, {a.shape[1]})")
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
        ptr = ctypes.c_void_p
        self._lib.skinny_gemm_softmax_product(
            a.shape[0],
            b.shape[1],
            a.shape[1],
            first,
            ptr(a.ctypes.data),
            ptr(b.ctypes.data),
            ptr(out.ctypes.data),
        )
        return out

    def matches_openblas(
        self, n: int, k: int, seed: int = 0, m: int = 1, packed: bool = False
    ) -> bool:
        """Whether this kernel's m-row product has the bits OpenBLAS's sgemm gives those rows
        inside a prefill (a product tall enough for its ordinary path), on random operands.
        `packed`: the weight is read through its packed copy, as a loaded model's are."""
        import numpy as np

        a, b = self._operands(m, n, k, seed)
        if packed and not self.pack(b.ctypes.data, n, k):
            raise MemoryError("could not pack the weight")
        try:
            mine = self.product(a, b)
        finally:
            if packed:
                self.unpack(b.ctypes.data)
        theirs = self._product(self._lib.skinny_gemm_reference, a, b)
        return bool(np.array_equal(mine.view(np.uint32), theirs.view(np.uint32)))

    def rows_independent(self, n: int, k: int, seed: int = 0) -> bool:
        """Whether OpenBLAS gives a row the same bits in a 16-row product as in a 100-row one:
        without that no kernel can give a decode row its prefill's bits."""
        import numpy as np

        a, b = self._operands(100, n, k, seed)
        tall = self._product(self._lib.skinny_gemm_openblas, a, b)
        short = self._product(self._lib.skinny_gemm_reference, np.ascontiguousarray(a[:16]), b)
        return bool(np.array_equal(tall[:16].view(np.uint32), short.view(np.uint32)))

    def find_blocking(self, threads: int) -> tuple[int, int] | None:
        """sgemm's K block and split rounding on this machine, found bit-for-bit; None: no match."""
        for k_block in _BLOCKS:
            for unroll in _UNROLLS:
                self.configure(False, k_block, unroll, threads)
                if all(self.matches_openblas(_PROBE_N, k) for k in _PROBE_K) and all(
                    self.matches_openblas(_PROBE_N, k, m=3) for k in _PROBE_K[:2]
                ):
                    return k_block, unroll
        return None

    def counters(self) -> dict[str, int]:
        """Calls taken, calls left to OpenBLAS, shapes refused by their first-call check,
        products computed from a packed copy of their weight, and of the products split over
        two threads, the second halves the helper computed and those the caller took back;
        attention's softmax products; and greedy steps' screened output products, those that
        computed the full product instead, and the 16-word blocks they computed exactly."""
        return {
            "taken": int(self._lib.skinny_gemm_counter(0)),
            "passed": int(self._lib.skinny_gemm_counter(1)),
            "shapes_refused": int(self._lib.skinny_gemm_counter(2)),
            "packed": int(self._lib.skinny_gemm_counter(3)),
            "helper_halves": int(self._lib.skinny_gemm_counter(4)),
            "halves_taken_back": int(self._lib.skinny_gemm_counter(5)),
            "softmax_products": int(self._lib.skinny_gemm_counter(6)),
            "screened": int(self._lib.skinny_gemm_counter(7)),
            "screen_fallbacks": int(self._lib.skinny_gemm_counter(8)),
            "screen_blocks": int(self._lib.skinny_gemm_counter(9)),
        }


def cpu_supports_kernel(flags: set[str]) -> bool:
    return {"avx2", "fma"} <= flags


def build(home: Path) -> Path:
    """The compiled library for this source, compiled now if missing. Raises OSError/RuntimeError."""
    source = b"".join(path.read_bytes() for path in (SOURCE, *INCLUDED))
    digest = hashlib.sha256(source).hexdigest()[:16]
    out = home / "native" / f"skinny_gemm-{digest}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) to build it: install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    # -ffp-contract=off: the order of every multiply-add is the point, the compiler must not fuse
    # or reorder anything beyond the explicit fmaf calls.
    cmd = [compiler, "-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared"]
    cmd += ["-o", tmp, str(SOURCE), "-ldl", "-lpthread"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
    os.replace(tmp, out)  # atomic: a concurrent builder never loads a half-written file
    return out


def preload(home: Path) -> SkinnyGemm:
    """Build and load the library into the global symbol scope (before OpenBLAS and mlx.core)."""
    path = build(home)
    return SkinnyGemm(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL), path)


def activate(kernel: SkinnyGemm, openblas: str, threads: int) -> SkinnyStatus:
    """Bind the real OpenBLAS, find its K blocking, and route one-row calls here if it matched."""
    if not kernel.bind(openblas):
        return SkinnyStatus(False, f"could not bind cblas_sgemm in {openblas}")
    if not all(kernel.rows_independent(_PROBE_N, k) for k in _PROBE_K):
        kernel.configure(False, 0, 1, 1)
        return SkinnyStatus(
            False,
            "this OpenBLAS gives a row other bits depending on how many rows the product has: "
            "left to OpenBLAS (cached and cold runs may differ in the last bits)",
        )
    found = kernel.find_blocking(threads)
    if found is None:
        kernel.configure(False, 0, 1, 1)
        return SkinnyStatus(
            False, "no K blocking reproduces this OpenBLAS's sgemm bit for bit: left to OpenBLAS"
        )
    kernel.blocking, kernel.threads = found, threads
    kernel.set_enabled(True)
    return SkinnyStatus(
        True,
        f"decode matmuls (one row; up to {MAX_ROWS} in small products) bit-identical to "
        "OpenBLAS sgemm's prefill rows "
        f"(K block {found[0]}), {threads} threads",
        found[0],
        threads,
        str(kernel.path),
    )
