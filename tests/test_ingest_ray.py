"""The Ray engine (`ingest --engine ray`) in a local Ray cluster: the table it writes is the local
engine's, and it keeps the local engine's guarantees (incremental, --sync, bad files skipped with
their reason, a killed job finished by rerunning it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.settings import load_settings
from ragcache.store import open_store
from tests.ingest_support import embedder, generator_tokens, write_markdown_corpus

ray = pytest.importorskip("ray", reason="the Ray engine needs ragcache[ray]")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    from ragcache.ray_cluster import connect

    connect(None, num_cpus=2)
    yield
    ray.shutdown()


def _ingest(corpus: Path, db: Path, engine: str, sync: bool = False):
    spec = JobSpec(paths=(str(corpus),), db_dir=db, engine=engine, sync=sync)
    return run_job(spec, load_settings().home, embedder=embedder(), tokens=generator_tokens())


def _table(db: Path) -> dict[str, dict]:
    rows = open_store(db).table.to_arrow().to_pylist()
    return {r["chunk_id"]: r for r in rows}


def _assert_same_tables(a: Path, b: Path) -> None:
    left, right = _table(a), _table(b)
    assert left.keys() == right.keys() and left
    for chunk_id, row in left.items():
        other = right[chunk_id]
        for key in ("doc_id", "text", "token_ids", "n_tokens", "doc_hash", "position", "source"):
            assert row[key] == other[key], (chunk_id, key)
        np.testing.assert_allclose(row["vector"], other["vector"], atol=1e-5)


def test_ray_table_equals_local_and_keeps_the_guarantees(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    paths = write_markdown_corpus(corpus, 24, paragraphs=4)
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF")
    local = _ingest(corpus, tmp_path / "local", "local")
    on_ray = _ingest(corpus, tmp_path / "ray", "ray")
    _assert_same_tables(tmp_path / "local", tmp_path / "ray")
    assert on_ray.chunks_written == local.chunks_written > 0
    assert (
        [(s.path, s.reason) for s in on_ray.skipped]
        == [(s.path, s.reason) for s in local.skipped]
        != []
    )

    again = _ingest(corpus, tmp_path / "ray", "ray")  # incremental: nothing re-embedded
    assert again.chunks_written == 0 and again.unchanged == 24

    for p in paths[:5]:
        p.write_text(p.read_text().replace("paragraph 2.", "paragraph two, edited."))
    for p in paths[-3:]:
        p.unlink()
    local2 = _ingest(corpus, tmp_path / "local", "local", sync=True)
    ray2 = _ingest(corpus, tmp_path / "ray", "ray", sync=True)
    _assert_same_tables(tmp_path / "local", tmp_path / "ray")
    assert sorted(ray2.updated) == sorted(local2.updated) != []
    assert ray2.removed_chunk_ids == local2.removed_chunk_ids != []


def test_a_killed_ray_job_is_finished_by_rerunning_it(tmp_path: Path) -> None:
    corpus, db = tmp_path / "corpus", tmp_path / "db"
    write_markdown_corpus(corpus, 24, paragraphs=5)
    _ingest(corpus, tmp_path / "ref", "local")
    cmd = [sys.executable, "-m", "ingest", str(corpus), "--db", str(db), "--batch", "8",
           "--no-progress", "--engine", "ray"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if open_store(db).table.version >= 3:  # created, then two batches committed
                    break
            except Exception:  # not created yet
                pass
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = open_store(db).count()
    assert 0 < partial < open_store(tmp_path / "ref").count()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_tables(tmp_path / "ref", db)


def test_an_unreachable_cluster_is_a_clear_error_before_anything_is_written(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    write_markdown_corpus(corpus, 2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ingest", str(corpus), "--db", str(tmp_path / "db"),
           "--engine", "ray", "--address", "127.0.0.1:9"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "cannot use the Ray cluster at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "db").exists()  # nothing written, not even an empty table
