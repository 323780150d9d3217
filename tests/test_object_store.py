"""Stores on object storage: ingest, ask and the job's side state against a real S3 server.

moto's S3 server runs on 127.0.0.1 for the module; LanceDB reaches it through the usual AWS
environment (AWS_ENDPOINT, AWS_ALLOW_HTTP, keys), exactly as it would reach S3.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.lease import LeaseSettings, table_lease
from ingest.pipeline import JobSpec, run_job
from ragcache.retrieve import Retriever
from ragcache.settings import load_settings
from ragcache.store import StoreBusyError, StoreError, open_store
from ragcache.store_location import is_remote, normalise
from tests.ingest_support import embedder, generator_tokens, write_markdown_corpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server with one bucket; the AWS environment points at it. Yields the bucket URI."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("PUT", "/ragcache-test")  # create the bucket
            assert conn.getresponse().status == 200
            break
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield "s3://ragcache-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def test_locations_are_parsed_before_anything_is_written(tmp_path: Path) -> None:
    assert is_remote("s3://bucket/prefix") and not is_remote(tmp_path)
    assert normalise("file:///tmp/x") == Path("/tmp/x")
    assert normalise("s3://bucket/prefix/") == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="unknown store scheme 's4'"):
        normalise("s4://bucket")
    with pytest.raises(StoreError, match="unknown store scheme"):
        open_store("s4://bucket/x")


def tables(db) -> list[str]:
    return list(db.list_tables().tables)


def ingest(corpus: Path, db: str, sync: bool = False):
    spec = JobSpec(paths=(str(corpus),), db_dir=db, sync=sync)
    return run_job(spec, load_settings().home, embedder=embedder(), tokens=generator_tokens())


def test_ingest_ask_reingest_and_sync_on_s3(s3: str, tmp_path: Path) -> None:
    corpus = tmp_path / "docs"
    write_markdown_corpus(corpus, 3)
    db = f"{s3}/stores/one"
    first = ingest(corpus, db)
    assert first.chunks_written > 0 and not first.skipped
    store = open_store(db)
    assert store.count() == first.total_chunks
    hits = Retriever(store, embedder()).retrieve("What does a cache keep?", 3).hits
    assert hits and all(h.token_ids for h in hits)
    # incremental: nothing changed, nothing embedded again
    again = ingest(corpus, db)
    assert again.chunks_written == 0 and again.total_chunks == first.total_chunks
    # --sync deletes what left the corpus; the removed ids are reported (journal in the store)
    victim = sorted(p for p in corpus.rglob("*") if p.is_file())[0]
    victim.unlink()
    synced = ingest(corpus, db, sync=True)
    assert synced.removed_chunk_ids and synced.total_chunks < first.total_chunks
    store.table.checkout_latest()
    assert store.count() == synced.total_chunks
    left = tables(store.db)
    assert "_chunks_removed" not in left and "_chunks_lease" not in left  # side state cleared


def test_a_second_writer_is_refused_and_a_dead_writers_lease_is_taken_over(s3: str) -> None:
    import lancedb

    db = lancedb.connect(f"{s3}/stores/lease")
    with (
        table_lease(db, "chunks", "s3 test"),
        pytest.raises(StoreBusyError, match="another ingest job"),
        table_lease(db, "chunks", "s3 test"),
    ):
        pass
    # a holder killed mid-job leaves its lease behind; once expired, the next job takes it
    short = LeaseSettings(ttl_s=0.2, renew_every_s=10)
    stale = table_lease(db, "chunks", "s3 test", short)
    stale.__enter__()  # never exited: the "killed" job
    time.sleep(0.3)
    with table_lease(db, "chunks", "s3 test"):
        assert "_chunks_lease" in tables(db)
    assert "_chunks_lease" not in tables(db)


def test_a_missing_bucket_is_a_clear_error(s3: str, tmp_path: Path) -> None:
    corpus = tmp_path / "docs"
    write_markdown_corpus(corpus, 1)
    with pytest.raises(StoreError, match="no-such-bucket"):
        ingest(corpus, "s3://no-such-bucket/x")
