"""The `ragcache` command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragcache.model_loader import LoadedModel

RAGCACHE = [sys.executable, "-m", "ragcache.cli"]


def run(
    *args: str, env: dict | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RAGCACHE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
        env={**os.environ, **(env or {})},
    )


def test_generate_streams_from_a_model_folder(tiny_llama: LoadedModel) -> None:
    out = run(
        "generate",
        "the cache keeps",
        "--model",
        str(tiny_llama.path),
        "--max-tokens",
        "5",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["generated_tokens"] == 5 and result["prompt_tokens"] > 0


def test_generate_reads_stdin(tiny_llama: LoadedModel) -> None:
    out = run(
        "generate",
        "-",
        "--model",
        str(tiny_llama.path),
        "--max-tokens",
        "3",
        "--json",
        stdin="the cache keeps",
    )
    assert out.returncode == 0, out.stderr


def test_unknown_model_exits_3_with_a_hint() -> None:
    out = run("generate", "hi", "--model", "./not-a-model")
    assert out.returncode == 3
    assert "neither an embedded model" in out.stderr and "hint:" in out.stderr


def test_unknown_env_var_exits_2() -> None:
    out = run("model", "list", env={"RAGCACHE_MODLE": "x"})
    assert out.returncode == 2 and "RAGCACHE_MODLE" in out.stderr


def test_bad_quant_is_rejected_by_the_parser() -> None:
    out = run("model", "prepare", "--quant", "int3")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_doctor_json_reports_blas_and_gemm() -> None:
    out = run("doctor", "--json")
    report = json.loads(out.stdout)
    assert {"blas", "gemm_gflops", "mlx_device", "model_path", "free_memory_bytes"} <= set(report)
    if sys.platform.startswith("linux") and report["blas"]["optimized"]:
        assert report["gemm_gflops"] > 20
    assert out.returncode == (1 if report["problems"] else 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS path")
def test_reference_blas_is_reported_as_a_problem() -> None:
    out = run("doctor", "--json", env={"RAGCACHE_BLAS": "reference"})
    report = json.loads(out.stdout)
    assert report["blas"]["name"] == "reference" and out.returncode == 1
    assert any("reference BLAS" in p for p in report["problems"])


@pytest.mark.slow
def test_embedded_default_model_answers_end_to_end(home: Path) -> None:
    out = run(
        "generate",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "12",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "paris" in result["text"].lower()


@pytest.mark.slow
def test_embedded_gemma_completes_text(home: Path) -> None:
    out = run(
        "generate",
        "Question: What is the capital of France?\nAnswer:",
        "--model",
        "gemma3-270m",
        "--max-tokens",
        "4",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert "paris" in json.loads(out.stdout.strip().splitlines()[-1])["text"].lower()
