"""Full CPU speed on Linux: put an optimized BLAS under MLX before MLX loads.

The `mlx[cpu]` Linux wheel links the reference BLAS (~3-8 GFLOP/s float32 GEMM here). Loading the
system's OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported puts its `cblas_*` symbols first
in the global lookup scope, so libmlx binds to them instead of its bundled copy: the same effect as
LD_PRELOAD, with no re-exec, for the CLI, tests and library users alike (measured 7.7 -> 229-370
GFLOP/s on this machine). `import ragcache` does this; importing mlx first makes it too late, which
`blas_status()` reports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ragcache import skinny_gemm
from ragcache.settings import BlasSettings, default_home, read_blas_settings


@dataclass(frozen=True)
class BlasStatus:
    """What BLAS MLX's CPU backend uses in this process, and why."""

    name: str  # "openblas", "accelerate", "reference"
    library: str  # path of the loaded library, "" if none
    core_type: str  # OpenBLAS kernel family in use, "" if not OpenBLAS
    core_type_source: str  # "environment", "cpu flags", "autodetect", ""
    optimized: bool
    reason: str  # one line a person can act on
    # Decode's one-row matmuls through ragcache.skinny_gemm: whether, and why (not).
    skinny_gemm: bool = False
    skinny_gemm_reason: str = ""


_status: BlasStatus | None = None
_kernel: skinny_gemm.SkinnyGemm | None = None


def _arch_triplet() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, machine)


def openblas_candidates() -> list[Path]:
    """System OpenBLAS builds, best first: the pthread build, then whatever the linker finds."""
    triplet = _arch_triplet()
    paths = [
        Path(f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0"),
        Path(f"/usr/lib/{triplet}/libopenblas.so.0"),
        Path("/usr/lib64/libopenblasp.so.0"),
        Path("/usr/lib64/libopenblas.so.0"),
        Path(f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0"),
    ]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(Path(found) if "/" in found else Path(f"/usr/lib/{triplet}") / found)
    return [p for p in paths if p.exists()]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def core_type_for(flags: set[str]) -> str:
    """The OpenBLAS kernel family this CPU can run; "" lets OpenBLAS autodetect.

    OpenBLAS 0.3.21 (Debian 12) misdetects recent AMD and Intel parts, so name the kernel from the
    instruction sets: SkylakeX needs AVX-512 F/BW/VL/DQ/CD, Haswell needs AVX2 + FMA.
    """
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return ""


def _corename(lib: ctypes.CDLL) -> str:
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return ""
    fn.restype = ctypes.c_char_p
    value = fn()
    return value.decode() if value else ""


def ensure_fast_blas(settings: BlasSettings | None = None) -> BlasStatus:
    """Load an optimized BLAS into the process once, before MLX; return what is in use.

    Changes: may set OPENBLAS_CORETYPE (only when unset) and loads a shared library globally.
    Never raises: a missing library is reported in the status, and generation still works.
    """
    global _status
    if _status is not None:
        return _status
    settings = settings or read_blas_settings()
    if sys.platform == "darwin":
        _status = BlasStatus("accelerate", "", "", "", True, "macOS: MLX uses Accelerate and Metal")
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus("reference", "", "", "", False, f"no BLAS tuning for {sys.platform}")
        return _status
    if settings.mode == "reference":
        _status = BlasStatus("reference", "", "", "", False, "RAGCACHE_BLAS=reference asked for it")
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(
            "reference",
            "",
            "",
            "",
            False,
            "mlx was imported before ragcache, so the optimized BLAS could not be put under it: "
            "import ragcache first",
        )
        return _status
    candidates = [Path(settings.library)] if settings.library else openblas_candidates()
    if not candidates:
        _status = BlasStatus(
            "reference",
            "",
            "",
            "",
            False,
            "no OpenBLAS found: install it (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
            "Fedora: dnf install openblas) or run the README's set-up command",
        )
        return _status
    source = "environment" if os.environ.get("OPENBLAS_CORETYPE") else ""
    if not source:
        chosen = core_type_for(cpu_flags())
        if chosen:
            os.environ["OPENBLAS_CORETYPE"] = chosen
            source = "cpu flags"
        else:
            source = "autodetect"
    # The one-row kernel goes first into the global scope, so libmlx's cblas_sgemm binds to it.
    kernel, skinny_reason = _preload_skinny(settings)
    try:
        lib = ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _status = BlasStatus(
            "reference", "", "", "", False, f"could not load {candidates[0]}: {exc}"
        )
        return _status
    skinny_on = False
    if kernel is not None:
        done = skinny_gemm.activate(kernel, str(candidates[0]), _blas_threads(lib))
        skinny_on, skinny_reason = done.active, done.reason
        if skinny_on:  # what load_model does with a model's weights (ragcache.packed_weights)
            skinny_reason += (
                "; weights read row-major (RAGCACHE_PACKED_WEIGHTS=0)"
                if not settings.packed_weights
                else "; a loaded model's weights read from packed copies (4-bit codes where a "
                "weight is exactly those)"
                if settings.q4_weights
                else "; a loaded model's weights read from packed float copies "
                "(RAGCACHE_Q4_WEIGHTS=0)"
            )
        if skinny_on:
            global _kernel
            _kernel = kernel
    _status = BlasStatus(
        "openblas",
        str(candidates[0]),
        _corename(lib),
        source,
        True,
        "OpenBLAS loaded under MLX",
        skinny_on,
        skinny_reason,
    )
    return _status


def _preload_skinny(settings: BlasSettings) -> tuple[skinny_gemm.SkinnyGemm | None, str]:
    if not settings.skinny_gemm:
        return None, "RAGCACHE_SKINNY_GEMM=0"
    if platform.machine() != "x86_64" or not skinny_gemm.cpu_supports_kernel(cpu_flags()):
        return None, "the kernel needs an x86-64 CPU with AVX2 and FMA"
    try:
        return skinny_gemm.preload(default_home()), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, str(exc)


def _blas_threads(lib: ctypes.CDLL) -> int:
    """As many threads as OpenBLAS uses (OPENBLAS_NUM_THREADS), at most 2: one-row products
    are bound by memory bandwidth, which two cores already saturate here."""
    try:
        n = int(lib.openblas_get_num_threads())
    except (AttributeError, ValueError):
        n = os.cpu_count() or 1
    return max(1, min(2, n))


def skinny_kernel() -> skinny_gemm.SkinnyGemm | None:
    """The active one-row kernel (its counters, its switch), or None when it is off."""
    return _kernel


def blas_status() -> BlasStatus:
    """The status recorded at import, loading the BLAS now if that never happened."""
    return _status if _status is not None else ensure_fast_blas()
