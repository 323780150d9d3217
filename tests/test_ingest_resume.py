"""Resumability with a real SIGKILL: a job killed mid-way leaves a readable, consistent table, and
rerunning the same command finishes it with no duplicate and no missing chunk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.pipeline import JobSpec, run_job
from ragcache.settings import load_settings
from ragcache.store import open_store
from tests.ingest_support import embedder, generator_tokens, write_markdown_corpus

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _command(corpus: Path, db: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ingest", str(corpus), "--db", str(db), "--batch", "8",
            "--no-progress", *extra]  # fmt: skip


def _rows(db: Path) -> int:
    try:
        return open_store(db).count()
    except Exception:  # the table may not exist yet
        return 0


def _version(db: Path) -> int:
    try:
        return open_store(db).table.version
    except Exception:  # the table may not exist yet
        return 0


def _kill_after_commits(cmd: list[str], db: Path, commits: int, timeout_s: float = 120) -> None:
    """Start the job and SIGKILL it once `commits` more table versions have landed."""
    start = _version(db)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _version(db) - start >= commits:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def _check_consistent(db: Path) -> dict[str, set[str]]:
    """Every stored document holds exactly the chunks of one version; returns doc -> chunk ids."""
    states = open_store(db).doc_states()
    for s in states.values():
        assert len(s.doc_hashes) == 1, f"{s.doc_id} mixes versions"
        assert len(s.chunk_ids) == s.doc_chunks == len(set(s.chunk_ids)), f"{s.doc_id} incomplete"
    return {d: set(s.chunk_ids) for d, s in states.items()}


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*cmd, "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def _reference(corpus: Path, db: Path) -> dict[str, set[str]]:
    spec = JobSpec(paths=(str(corpus),), db_dir=db)
    run_job(spec, load_settings().home, embedder=embedder(), tokens=generator_tokens())
    return _check_consistent(db)


def test_sigkill_mid_job_then_rerun_gives_the_clean_result(tmp_path):
    corpus, db = tmp_path / "corpus", tmp_path / "db"
    paths = write_markdown_corpus(corpus, 40, paragraphs=6)
    expected = _reference(corpus, tmp_path / "ref")
    total = sum(len(v) for v in expected.values())

    cmd = _command(corpus, db)
    _kill_after_commits(cmd, db, 2)  # table created, then the first batch committed
    first = _rows(db)
    assert 0 < first < total
    _check_consistent(db)
    _kill_after_commits(cmd, db, 3)
    assert first < _rows(db) < total
    _check_consistent(db)
    _finish(cmd)
    assert _check_consistent(db) == expected
    assert open_store(db).count() == total  # no duplicate rows either

    # A job that updates and deletes (--sync), killed after its first commit, then rerun.
    for p in paths[:10]:
        p.write_text(p.read_text().replace("paragraph 3.", "paragraph three, edited."))
    for p in paths[-5:]:
        p.unlink()
    expected2 = _reference(corpus, tmp_path / "ref2")
    sync_cmd = _command(corpus, db, "--sync")
    _kill_after_commits(sync_cmd, db, 1)
    _check_consistent(db)
    report = json.loads(_finish(sync_cmd).stdout)
    final = _check_consistent(db)
    assert final == expected2
    removed = set().union(*expected.values()) - set().union(*final.values())
    # The killed job's removals reach the rerun's report through the journal: none is lost.
    assert set(report["removed_chunk_ids"]) == removed != set()
