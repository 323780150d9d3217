"""Helpers shared by the benchmarks: results files, plots, machine facts."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    import mlx.core as mx

    from ragcache.blas import blas_status

    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "mlx_device": str(mx.default_device()),
        "blas": blas_status().name,
        "blas_core": blas_status().core_type,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def mlx_lm_server_command(model_path: Path, port: int) -> list[str]:
    """mlx_lm.server on 127.0.0.1, started through `import ragcache` so it gets the same
    OpenBLAS under MLX as ragcache does: baselines must not run on the reference BLAS."""
    code = "import sys, ragcache; from mlx_lm.server import main; sys.exit(main())"
    return [
        sys.executable,
        "-c",
        code,
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
