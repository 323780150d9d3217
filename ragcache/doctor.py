"""`ragcache doctor`: what this machine gives ragcache, measured, and how to fix what is wrong."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ragcache.blas import blas_status, skinny_kernel
from ragcache.cache.settings import available_memory_bytes as free_memory_bytes
from ragcache.embedded_models import EMBEDDED_MODELS
from ragcache.model_prepare import is_complete, prepared_path
from ragcache.settings import Settings

# Below this a 1024^3 float32 GEMM is running on a reference BLAS (about 3-8 here).
MIN_GOOD_GFLOPS = 50.0


@dataclass
class DoctorReport:
    platform: str
    python: str
    mlx: str
    mlx_lm: str
    mlx_device: str
    blas: dict
    gemm_gflops: float
    model: str
    model_path: str
    model_prepared: bool
    model_quantization: str
    free_memory_bytes: int
    attention: str = ""  # which softmax long attention uses, and why
    decode_attention: str = ""  # what decode steps' attention runs on, and why
    rope: str = ""  # whether nn.RoPE runs from tables of its cos and sin, and why
    output_screen: str = ""  # whether greedy steps screen the output layer, and why
    norms: str = ""  # whether small RMS norms run as one compiled call, and why
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def measure_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 n x n matmul rate on MLX's default device, after one warm-up."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a, b, a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def run_doctor(settings: Settings) -> DoctorReport:
    import mlx.core as mx

    from ragcache import attention

    status = blas_status()
    gflops = measure_gemm_gflops()
    fast, why = attention.available()
    if not settings.blas.fast_softmax:
        fast, why = False, "RAGCACHE_FAST_SOFTMAX=0: MLX's own softmax"
    native, native_why = attention.decode_available(skinny_kernel())
    if not settings.blas.decode_attention:
        native, native_why = False, "RAGCACHE_DECODE_ATTENTION=0: MLX's attention"
    name = settings.model.name
    quant = settings.model.quant
    if name in EMBEDDED_MODELS:
        path = prepared_path(settings.home, name, quant)
        prepared = is_complete(path)
        quantization = "float32" if quant == "none" else quant
    else:
        path = Path(name).expanduser()
        prepared = (path / "config.json").exists()
        quantization = "see config.json" if prepared else "unknown"
    report = DoctorReport(
        platform=f"{platform.system()} {platform.machine()}",
        python=sys.version.split()[0],
        mlx=_pkg_version("mlx"),
        mlx_lm=_pkg_version("mlx-lm"),
        mlx_device=str(mx.default_device()),
        blas=asdict(status),
        gemm_gflops=round(gflops, 1),
        model=name,
        model_path=str(path),
        model_prepared=prepared,
        model_quantization=quantization,
        free_memory_bytes=free_memory_bytes(),
        attention=f"{'fast' if fast else 'mlx'}: {why}",
        decode_attention=f"{'native' if native else 'mlx'}: {native_why}",
        rope=_rope_line(settings),
        output_screen=_output_screen_line(settings),
        norms=_norms_line(settings),
    )
    if not status.optimized and sys.platform.startswith("linux"):
        report.problems.append(f"MLX runs on the reference BLAS: {status.reason}")
        report.fixes.append(
            "apt-get install libopenblas0-pthread (or run the README's set-up command), "
            "and import ragcache before mlx"
        )
    if gflops < MIN_GOOD_GFLOPS and sys.platform.startswith("linux"):
        report.problems.append(f"float32 GEMM runs at {gflops:.1f} GFLOP/s (expected >= 100)")
        report.fixes.append("check OPENBLAS_CORETYPE, and that nothing else loads a BLAS first")
    if not prepared:
        report.problems.append(f"model {name!r} is not prepared at {path}")
        report.fixes.append(
            f"ragcache model prepare {name}" + (f" --quant {quant}" if quant != "none" else "")
        )
    if report.free_memory_bytes and report.free_memory_bytes < 2 << 30:
        report.problems.append(f"only {report.free_memory_bytes >> 20} MiB of memory free")
        report.fixes.append("close other programs or lower the cache budget")
    return report


def _rope_line(settings: Settings) -> str:
    import mlx.core as mx

    if not settings.blas.rope_tables:
        return "mlx: RAGCACHE_ROPE_TABLES=0"
    if mx.default_device().type != mx.cpu:
        return "mlx: not on the CPU, MLX's own rope kernel is used"
    return (
        "tables: cos and sin computed once, for models whose bits they reproduce on a check at "
        "load (ragcache.rope_table)"
    )


def _norms_line(settings: Settings) -> str:
    import mlx.core as mx

    from ragcache import compiled_norm

    if not settings.blas.compiled_norms:
        return "mlx: RAGCACHE_COMPILED_NORMS=0"
    if mx.default_device().type != mx.cpu:
        return "mlx: not on the CPU, MLX's own norm kernel is used"
    if not compiled_norm.compiler_available():
        return "mlx: no g++ here, so MLX cannot fuse a compiled norm (install g++)"
    return (
        "compiled: decode steps' RMS norms in one fused call, for models whose bits it reproduces "
        "on a check at load (ragcache.compiled_norm)"
    )


def _output_screen_line(settings: Settings) -> str:
    if not settings.blas.output_screen:
        return "off: RAGCACHE_OUTPUT_SCREEN=0, greedy steps compute every logit"
    if skinny_kernel() is None or not blas_status().skinny_gemm:
        return "off: it runs in the decode kernel, which is off here (see decode gemm)"
    if not settings.blas.packed_weights:
        return "off: it needs the packed weights (RAGCACHE_PACKED_WEIGHTS=0 here)"
    return (
        "on: greedy steps (up to 8 rows) score the vocabulary from an 8-bit copy of the output layer "
        "and compute only the words that can be the argmax (ragcache.output_screen)"
    )


def format_report(report: DoctorReport) -> str:
    b = report.blas
    lines = [
        f"platform      {report.platform}, Python {report.python}",
        f"mlx           {report.mlx} (mlx-lm {report.mlx_lm}), device {report.mlx_device}",
        f"blas          {b['name']} {b['library'] or ''} core={b['core_type'] or '-'} "
        f"({b['core_type_source'] or '-'}): {b['reason']}",
        f"decode gemm   {'on' if b['skinny_gemm'] else 'off'}: {b['skinny_gemm_reason'] or '-'}",
        f"attention     {report.attention}",
        f"decode attn   {report.decode_attention}",
        f"rope          {report.rope}",
        f"norms         {report.norms}",
        f"greedy head   {report.output_screen}",
        f"gemm          {report.gemm_gflops} GFLOP/s float32 (1024^3)",
        f"model         {report.model} [{report.model_quantization}] at {report.model_path} "
        f"({'ready' if report.model_prepared else 'not prepared'})",
        f"free memory   {report.free_memory_bytes / 2**30:.1f} GiB",
    ]
    if report.problems:
        lines.append("")
        for problem, fix in zip(report.problems, report.fixes, strict=True):
            lines.append(f"problem: {problem}\n  fix: {fix}")
    else:
        lines.append("all good")
    return "\n".join(lines)
