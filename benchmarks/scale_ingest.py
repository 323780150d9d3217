"""The store side of `benchmarks/scale.py`: Ray Data ingestion against the local pipeline, and a
store on S3 (moto's server on 127.0.0.1), measured on this machine.

- `ray_ingest_vs_local`: the same corpus into two fresh stores, local engine then Ray engine
  (`ingest --engine ray`, a local Ray cluster of this machine's CPUs, started before the clock
  runs, its start-up reported apart as `ray_start_s`): local seconds over Ray seconds.
- `ray_table_equal`: 1 when both tables hold the same chunk ids, token ids and texts and every
  vector agrees to 1e-5.
- `s3_ingest_ok`: the corpus ingested into s3://bucket/prefix and read back complete;
  `s3_search_p50_ms`: median hybrid search time over it (20 questions).
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ingest.pipeline import JobSpec, run_job
from ingest.tokens import load_tokens, tokenizer_folder
from ragcache.embedder import SentenceTransformerEmbedder
from ragcache.retrieve import Retriever
from ragcache.settings import load_settings
from ragcache.store import open_store


def _tables_equal(a: Path, b: Path) -> bool:
    left = {r["chunk_id"]: r for r in open_store(a).table.to_arrow().to_pylist()}
    right = {r["chunk_id"]: r for r in open_store(b).table.to_arrow().to_pylist()}
    if left.keys() != right.keys():
        return False
    for chunk_id, row in left.items():
        other = right[chunk_id]
        if any(row[k] != other[k] for k in ("text", "token_ids", "doc_id", "doc_hash")):
            return False
        if not np.allclose(row["vector"], other["vector"], atol=1e-5):
            return False
    return True


def ray_vs_local(corpus: list[str]) -> dict[str, Any]:
    from ragcache.ray_cluster import connect

    home = load_settings().home
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        local = run_job(JobSpec(paths=tuple(corpus), db_dir=Path(tmp) / "local"), home)
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        ray = connect(None, num_cpus=os.cpu_count())
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        remote = run_job(JobSpec(paths=tuple(corpus), db_dir=Path(tmp) / "ray", engine="ray"), home)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        equal = _tables_equal(Path(tmp) / "local", Path(tmp) / "ray")
    return {
        "corpus": corpus,
        "chunks": local.chunks_written,
        "local_s": round(local_s, 1),
        "ray_s": round(ray_s, 1),
        "ray_start_s": round(start_s, 1),
        "local_chunks_per_s": round(local.chunks_written / local_s, 2),
        "ray_chunks_per_s": round(remote.chunks_written / ray_s, 2),
        "ray_ingest_vs_local": round(local_s / ray_s, 3),
        "ray_ingest_vs_local_with_start": round(local_s / (ray_s + start_s), 3),
        "ray_table_equal": int(equal and remote.chunks_written == local.chunks_written),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_store(corpus: list[str], questions: list[str]) -> dict[str, Any]:
    """Ingest into a moto S3 server, read back, and time hybrid searches over it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT", "AWS_ALLOW_HTTP",
                                            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION")}  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("PUT", "/ragcache-bench")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        os.environ.update(
            AWS_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true",
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
        )  # fmt: skip
        uri = "s3://ragcache-bench/store"
        home = load_settings().home
        embedder = SentenceTransformerEmbedder()
        tokens = load_tokens(tokenizer_folder("smollm2-135m-instruct", home))
        t = time.perf_counter()
        report = run_job(JobSpec(paths=tuple(corpus), db_dir=uri), home, embedder=embedder,
                         tokens=tokens)  # fmt: skip
        ingest_s = time.perf_counter() - t
        store = open_store(uri)
        ok = store.count() == report.total_chunks == report.chunks_written > 0
        retriever = Retriever(store, embedder)
        retriever.retrieve(questions[0], k=5)  # warm: index files fetched once
        times = []
        for q in questions:
            t = time.perf_counter()
            retriever.retrieve(q, k=5)
            times.append((time.perf_counter() - t) * 1000)
        return {
            "s3_ingest_ok": int(ok),
            "s3_ingest_s": round(ingest_s, 1),
            "s3_chunks": report.chunks_written,
            "s3_search_p50_ms": round(statistics.median(times), 1),
            "s3_searches": len(times),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
