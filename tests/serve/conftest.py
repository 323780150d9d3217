"""Fixtures of the service tests: a small real store ingested with the tiny llama's tokenizer, and a
real server over it on 127.0.0.1 (session-scoped: the model and the embedder load once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.model_loader import LoadedModel
from ragcache.settings import Settings, load_settings
from serve.settings import ServeSettings
from tests.ingest_support import embedder, write_markdown_corpus
from tests.serve.server import ServerThread, free_port

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def core() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def tiny_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel, core: Settings
) -> Path:
    """A LanceDB folder holding 4 Markdown documents (12 chunks or so)."""
    root = tmp_path_factory.mktemp("serve-store")
    paths = write_markdown_corpus(root / "corpus", 4)
    spec = JobSpec(
        paths=tuple(str(p) for p in paths), db_dir=root / "db", generator=str(tiny_llama.path)
    )
    report = run_job(spec, core.home, embedder=embedder())
    assert report.chunks_written > 0
    return root / "db"


def tiny_settings(
    tiny_llama: LoadedModel, db_dir: Path, tmp: Path, **overrides: object
) -> ServeSettings:
    values: dict[str, object] = dict(
        port=free_port(),
        db_dir=db_dir,
        model=str(tiny_llama.path),
        cache_dir=tmp / "kv",
        cache_bytes=64 << 20,
        uploads_dir=tmp / "uploads",
        batches_dir=tmp / "batches",
        api_key=API_KEY,
        max_tokens=64,
        default_max_tokens=16,
        max_k=8,
        # The tiny models write noise, which no source supports: these tests exercise the
        # generation path, so the server never declines before running the model.
        decline_below=0.0,
        answer_mode="generate",
        max_body_bytes=64 * 1024,
        max_upload_bytes=256 * 1024,
        max_queue=16,
        max_batch=4,
        shutdown_timeout_s=10,
    )
    values.update(overrides)
    return ServeSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: LoadedModel,
    tiny_store: Path,
    core: Settings,
) -> Iterator[ServerThread]:
    """The tiny llama over the tiny store, with auth on."""
    tmp = tmp_path_factory.mktemp("serve")
    srv = ServerThread(tiny_settings(tiny_llama, tiny_store, tmp), core).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def busy_server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: LoadedModel,
    tiny_store: Path,
    core: Settings,
) -> Iterator[ServerThread]:
    """A small queue, a 2 MiB KV budget (so eviction runs), no auth, CORS for one origin."""
    tmp = tmp_path_factory.mktemp("serve-busy")
    settings = tiny_settings(
        tiny_llama,
        tiny_store,
        tmp,
        api_key=None,
        cache_bytes=2 << 20,
        max_queue=8,
        max_batch=4,
        max_tokens=2048,
        cors_origins=("http://allowed.example",),
    )
    srv = ServerThread(settings, core).start()
    yield srv
    srv.stop()
