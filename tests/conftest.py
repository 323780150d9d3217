"""Shared fixtures: tiny real models on disk, loaded through ragcache's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

import ragcache  # noqa: F401  (puts the fast BLAS under MLX before anything imports mlx)
from ragcache.model_loader import LoadedModel, load_model
from tests.tiny_models import GEMMA, LLAMA, TinySpec, build_tiny_model


def _load_tiny(factory: pytest.TempPathFactory, name: str, spec: TinySpec) -> LoadedModel:
    root = factory.mktemp(f"tiny-{name}")
    folder = build_tiny_model(root / name, spec)
    return load_model(str(folder), root / "home")


@pytest.fixture(autouse=True)
def _no_shadowing_datasets_module() -> None:
    """The repo's datasets/ folder shadows Hugging Face `datasets` when the root is on sys.path
    (as pytest puts it); see ragcache.store.forget_shadowing_datasets."""
    from ragcache.store import forget_shadowing_datasets

    forget_shadowing_datasets()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A 3-layer llama with plain attention: every layer's cache can be cut back to any length."""
    return _load_tiny(tmp_path_factory, "llama", LLAMA)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A 6-layer gemma3_text whose 24-token sliding window wraps on any prompt past 24 tokens."""
    return _load_tiny(tmp_path_factory, "gemma", GEMMA)


@pytest.fixture()
def kernel():
    """The decode kernel (ragcache.skinny_gemm), switched back on after the test."""
    from ragcache.blas import blas_status, skinny_kernel

    k = skinny_kernel()
    assert k is not None, blas_status().skinny_gemm_reason
    yield k
    k.set_enabled(True)


@pytest.fixture(scope="session")
def home() -> Path:
    from ragcache.settings import load_settings

    return load_settings().home
