"""A running server sees what an ingest job in another process commits: new documents within the
refresh interval, changed or deleted ones without their old text and with their old KV dropped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ragcache.model_loader import LoadedModel
from ragcache.settings import Settings
from tests.serve.conftest import tiny_settings
from tests.serve.server import ServerThread

REPO = Path(__file__).resolve().parents[2]
REFRESH_S = 0.3
MANGO_V1 = "# Mango groves\n\nMango trees are watered deeply once a week during the dry season.\n"
MANGO_V2 = "# Mango groves\n\nMango trees are mulched with straw to keep the roots cool.\n"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: LoadedModel,
    tiny_store: Path,
    core: Settings,
) -> Iterator[tuple[ServerThread, Path]]:
    tmp = tmp_path_factory.mktemp("fresh")
    db = tmp / "db"
    shutil.copytree(tiny_store, db)  # this test's writes must not reach the shared store
    settings = tiny_settings(tiny_llama, db, tmp, store_refresh_s=REFRESH_S)
    srv = ServerThread(settings, core).start()
    yield srv, db
    srv.stop()


def ingest_in_another_process(db: Path, generator: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", *args, "--db", str(db), "--generator", str(generator)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` holds; fails after `seconds`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "the server never saw the commit"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_second_process_ingest_is_seen_then_its_change_retires_the_old_kv(
    served: tuple[ServerThread, Path], tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    srv, db = served
    http = httpx.Client(base_url=srv.base_url, headers=srv.headers, timeout=120)
    chunks_before = http.get("/ready").json()["chunks"]
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "mango.md").write_text(MANGO_V1, encoding="utf-8")

    ingest_in_another_process(db, tiny_llama.path, str(folder))
    waited = within(2.0, lambda: http.get("/ready").json()["chunks"] > chunks_before)
    assert waited <= 2.0
    docs = http.get("/v1/documents", params={"limit": 1000}).json()["documents"]
    mango = [d["id"] for d in docs if d["id"].endswith("mango.md")]
    assert len(mango) == 1
    body = {"question": "How often are mango trees watered?", "stream": False, "max_tokens": 4}
    first = http.post("/v1/ask", json=body).json()
    texts = [s["text"] for s in first["sources"] if s["doc_id"] == mango[0]]
    assert texts and "watered deeply" in texts[0]
    assert http.post("/v1/ask", json=body).json()["usage"]["cached_tokens"] > 0
    invalidated = http.get("/v1/cache").json()["stats"]["invalidated"]

    # Changed in place by another process: the old text is never retrieved again, and the KV
    # that held it is dropped.
    (folder / "mango.md").write_text(MANGO_V2, encoding="utf-8")
    ingest_in_another_process(db, tiny_llama.path, str(folder))

    def changed() -> bool:
        stats = http.get("/v1/cache").json()["stats"]
        return stats["invalidated"] > invalidated

    within(2.0, changed)
    after = http.post("/v1/ask", json=body).json()
    texts = [s["text"] for s in after["sources"] if s["doc_id"] == mango[0]]
    assert texts and "mulched" in texts[0] and all("watered deeply" not in t for t in texts)

    # Deleted by another process's --sync run: gone from the listing and from retrieval.
    (folder / "mango.md").unlink()
    (folder / "other.md").write_text("# Other\n\nNothing about fruit trees.\n", encoding="utf-8")
    ingest_in_another_process(db, tiny_llama.path, str(folder), "--sync")

    def deleted() -> bool:
        ids = [
            d["id"] for d in http.get("/v1/documents", params={"limit": 1000}).json()["documents"]
        ]
        return mango[0] not in ids

    within(2.0, deleted)
    final = http.post("/v1/ask", json=body).json()
    assert mango[0] not in {s["doc_id"] for s in final["sources"]}


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_an_upload_while_another_process_ingests_is_503_with_retry_after(
    served: tuple[ServerThread, Path],
) -> None:
    srv, db = served
    http = httpx.Client(base_url=srv.base_url, headers=srv.headers, timeout=120)
    # The lock an ingest job takes on the table (ingest.pipeline._job_lock), held by another
    # process for as long as its job runs.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db / ".chunks.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        doc = {"documents": [{"name": "busy.md", "text": "# Busy\n\nA busy store.\n"}]}
        r = http.post("/v1/documents", json=doc)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "StoreBusyError"
        assert "another ingest job" in r.json()["error"]["message"]
    finally:
        holder.kill()
        holder.wait()
    assert http.post("/v1/documents", json=doc).status_code == 201  # and it works once free


def test_a_failed_invalidation_is_retried_on_the_next_poll(
    tiny_llama: LoadedModel, tiny_store: Path, tmp_path: Path
) -> None:
    """The watcher moves past a commit before its retired chunks' KV is dropped: when dropping
    fails (the worker busy or restarting), the spans stay pending and the next poll drops them,
    so a changed document is never answered from its old KV."""
    from ragcache import failpoints
    from ragcache.cache import CacheSettings, PrefixCache
    from ragcache.engine import Engine
    from ragcache.sampling import SamplingParams
    from ragcache.segments import SegmentedPrompt
    from ragcache.store import open_store, tokenizer_identity
    from ragcache.store_watch import StoreWatcher, chunk_tokens
    from serve.refresh import StoreRefresher

    db = tmp_path / "db"
    shutil.copytree(tiny_store, db)
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "mango.md").write_text(MANGO_V1, encoding="utf-8")
    ingest_in_another_process(db, tiny_llama.path, str(folder))
    store = open_store(db)

    def tokenize(text: str) -> list[int]:
        return list(tiny_llama.tokenizer.encode(text, add_special_tokens=False))

    tokenizer_id = tokenizer_identity(tiny_llama.path)
    cache = PrefixCache(tiny_llama, CacheSettings(cache_bytes=1 << 26))
    refresher = StoreRefresher(StoreWatcher(store, tokenize, tokenizer_id), cache.invalidate, 0)
    rows = store.table.search().where("doc_id LIKE '%mango.md%'").limit(10).to_arrow().to_pylist()
    chunk = chunk_tokens(rows[0], tokenize, tokenizer_id)
    prompt = SegmentedPrompt([1, 2, 3, *chunk, 7, 8], [3, 3 + len(chunk), len(chunk) + 5])
    engine = Engine(tiny_llama, cache=cache)
    engine.generate(prompt, SamplingParams(max_tokens=1))
    assert cache.tree.match(prompt.tokens).prefix_len >= 3 + len(chunk)

    (folder / "mango.md").write_text(MANGO_V2, encoding="utf-8")
    ingest_in_another_process(db, tiny_llama.path, str(folder))
    failpoints.arm("cache.invalidate=1")
    try:
        with pytest.raises(failpoints.InjectedFault):
            refresher.poll_once()
    finally:
        failpoints.arm("")
    assert refresher.pending  # the commit is seen, its KV not yet dropped
    assert refresher.poll_once() is None  # no new commit; the pending spans are dropped now
    assert not refresher.pending and refresher.kv_nodes_dropped > 0
    assert cache.tree.match(prompt.tokens).prefix_len < 3 + len(chunk)
    engine.close()
