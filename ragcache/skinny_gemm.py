"""Decode steps' one-row matmuls at memory speed, with OpenBLAS's exact bits.

A decode step multiplies one row by every weight matrix. MLX's CPU backend hands each of those to
`cblas_sgemm`, and OpenBLAS 0.3.21 packs the whole weight into a scratch copy on every such call
before its kernel reads it: on this machine the output layer of SmolLM2 (49152 x 576) took 21 ms
that way against 8.5 ms as a matrix-vector product. The matrix-vector product (`sgemv`) sums in
another order, though, and ragcache's promise is that cached, speculative and cold greedy runs
give the same tokens: a decode row must have the same bits as that row computed inside a prefill
or a speculative verify (many rows, OpenBLAS's sgemm). So `native/skinny_gemm.c` computes one-row
products in sgemm's own order (an FMA chain per output, restarted at each of sgemm's K blocks) on
two threads, and takes only calls where that is proven:

- the K block is found by probing this machine's OpenBLAS (bit-for-bit on several K);
- every new (n, k) shape is computed both ways on its first call and kept with OpenBLAS forever
  if any bit differs;
- everything else (prefill, verify, attention, any other caller) goes to OpenBLAS unchanged.

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
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("native") / "skinny_gemm.c"
# OpenBLAS K blocks (GEMM_Q) and split roundings to try, most likely first (Haswell sgemm: 320).
_BLOCKS = (320, 384, 256, 512, 448, 640, 768, 192, 128)
_UNROLLS = (4, 8, 16, 2, 1, 24, 32)
_PROBE_K = (576, 896, 1536, 2048, 4864)  # one and several K blocks, and split remainders
_PROBE_N = 256


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
        lib.skinny_gemm_compute.argtypes = [i, i, p, p, p]
        lib.skinny_gemm_compute.restype = None
        lib.skinny_gemm_reference.argtypes = [i, i, p, p, p]
        lib.skinny_gemm_reference.restype = None
        lib.skinny_gemm_counter.argtypes = [i]
        lib.skinny_gemm_counter.restype = ctypes.c_long

    def bind(self, openblas: str) -> bool:
        return int(self._lib.skinny_gemm_bind(openblas.encode())) == 0

    def configure(self, on: bool, k_block: int, unroll: int, threads: int) -> None:
        self._lib.skinny_gemm_configure(int(on), k_block, unroll, threads)

    def set_enabled(self, on: bool) -> None:
        """Route one-row calls here (with the blocking found) or leave every call to OpenBLAS."""
        if self.blocking is None:
            raise RuntimeError("the kernel was never activated")
        self.configure(on, *self.blocking, self.threads)

    def matches_openblas(self, n: int, k: int, seed: int = 0) -> bool:
        """Whether this kernel's one-row product has OpenBLAS sgemm's bits on random operands."""
        import numpy as np

        rng = np.random.default_rng(seed + 7919 * k + n)
        a = rng.standard_normal((1, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)
        mine, theirs = np.empty((1, n), np.float32), np.empty((1, n), np.float32)
        ptr = ctypes.c_void_p
        self._lib.skinny_gemm_compute(
            n, k, ptr(a.ctypes.data), ptr(b.ctypes.data), ptr(mine.ctypes.data)
        )
        self._lib.skinny_gemm_reference(
            n, k, ptr(a.ctypes.data), ptr(b.ctypes.data), ptr(theirs.ctypes.data)
        )
        return bool(np.array_equal(mine.view(np.uint32), theirs.view(np.uint32)))

    def find_blocking(self, threads: int) -> tuple[int, int] | None:
        """sgemm's K block and split rounding on this machine, found bit-for-bit; None: no match."""
        for k_block in _BLOCKS:
            for unroll in _UNROLLS:
                self.configure(False, k_block, unroll, threads)
                if all(self.matches_openblas(_PROBE_N, k) for k in _PROBE_K):
                    return k_block, unroll
        return None

    def counters(self) -> dict[str, int]:
        """Calls taken, calls left to OpenBLAS, and shapes refused by their first-call check."""
        return {
            "taken": int(self._lib.skinny_gemm_counter(0)),
            "passed": int(self._lib.skinny_gemm_counter(1)),
            "shapes_refused": int(self._lib.skinny_gemm_counter(2)),
        }


def cpu_supports_kernel(flags: set[str]) -> bool:
    return {"avx2", "fma"} <= flags


def build(home: Path) -> Path:
    """The compiled library for this source, compiled now if missing. Raises OSError/RuntimeError."""
    source = SOURCE.read_bytes()
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
        f"one-row matmuls bit-identical to OpenBLAS sgemm (K block {found[0]}), {threads} threads",
        found[0],
        threads,
        str(kernel.path),
    )
