"""The ingest job: scan, skip what is stored, load and chunk in a background thread, embed, commit.

Order of work and why it is safe to kill at any point:
1. Plan: hash every file; a document whose stored chunks are complete for the same version hash
   (content + tokenizer + embedder + chunk settings) is unchanged and costs no embedding.
2. A producer thread reads, parses and chunks the rest while the main thread embeds the previous
   batch (torch releases the GIL), so the embedder is never waiting on parsing.
3. Each batch of whole documents is one `replace_docs` commit: a document switches from its old
   chunks to its new ones atomically, so a rerun finds each document either done or not started.
4. `--sync` deletes documents that are gone from the scanned paths (never those whose file was
   merely skipped). Removed chunk ids go to a journal before each commit, so none is unreported.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.chunker import Tokens
from ingest.documents import Skipped
from ingest.formats import FileRef, content_fingerprint, is_multi_document
from ingest.journal import Journal, RemovalJournal, TableJournal
from ingest.lease import table_lease
from ingest.producer import END, DocumentProducer, DocWork
from ingest.report import JobReport, Progress
from ingest.rows import build_rows, doc_version
from ingest.settings import PIPELINE_VERSION, IngestSettings
from ingest.sources import DEFAULT_EXCLUDES, Scan, require_found, scan_paths
from ingest.tokens import GeneratorTokens, load_tokens, tokenizer_folder
from ragcache.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.store import (
    ChunkStore,
    DocState,
    StoreBusyError,
    StoreError,
    StoreSettings,
    connect,
    open_store,
)
from ragcache.store import tokenizer_identity as folder_tokenizer_identity
from ragcache.store_location import StoreLocation, normalise

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class JobSpec:
    """What to ingest and where."""

    paths: tuple[str, ...]
    db_dir: StoreLocation  # a local folder or an object-store URI (s3://bucket/prefix)
    table: str = "chunks"
    sync: bool = False
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    generator: str = "smollm2-135m-instruct"  # whose tokenizer counts and stores chunk tokens
    # "local": a producer thread and this process's embedder; "ray": Ray Data tasks load and
    # chunk, an actor pool embeds (ingest.ray_engine). Planning and commits stay here either way.
    engine: str = "local"
    ray_address: str | None = None  # None: a local Ray cluster on this machine


def run_job(
    spec: JobSpec,
    home: Path,
    settings: IngestSettings | None = None,
    *,
    embedder: Embedder | None = None,
    tokens: GeneratorTokens | None = None,
    progress: bool = False,
    on_removed: Callable[[list[str]], None] | None = None,
) -> JobReport:
    """Run one ingest job and return its report.

    Writes the table under `spec.db_dir` (created if missing) while holding an exclusive lock
    file beside it. Bad inputs are skipped and listed in the report. Raises SourceNotFoundError
    when a PATH does not exist, before the store is opened or created. Raises StoreError (and its
    SchemaMismatchError) when the store cannot be used; nothing stored is changed then.
    """
    start = time.perf_counter()
    settings = settings or IngestSettings()
    if spec.engine not in ENGINES:
        raise ValueError(f"unknown ingest engine {spec.engine!r}: use one of {', '.join(ENGINES)}")
    report = JobReport(db=str(spec.db_dir), table=spec.table)
    scan = scan_paths(spec.paths, spec.excludes)
    require_found(scan)  # first: a mistyped PATH must not leave an empty table behind
    report.skipped.extend(scan.skipped)
    report.ignored.extend(scan.ignored)
    if spec.engine == "ray" and spec.ray_address:
        from ragcache.ray_cluster import require_reachable

        require_reachable(spec.ray_address)  # before the store exists: a typo writes nothing
    embedder = embedder or SentenceTransformerEmbedder(settings.embedder)
    # The identity comes from the tokenizer files; the tokenizer itself loads only if needed.
    folder = None if tokens is not None else tokenizer_folder(spec.generator, home)
    tok_id = tokens.identity if tokens is not None else folder_tokenizer_identity(folder)  # type: ignore[arg-type]
    pipeline_id = _pipeline_id(settings, tok_id, embedder.identity)
    try:
        db = normalise(spec.db_dir)
    except ValueError as exc:
        raise StoreError(str(exc), hint="pass --db a folder or an s3://, gs://, az:// URI") from exc
    if isinstance(db, Path):
        if db.exists() and not db.is_dir():
            raise StoreError(f"{db} is a file, not a LanceDB folder", hint="pass --db a folder")
        db.mkdir(parents=True, exist_ok=True)
    with _job_lock(db, spec.table):
        store = open_store(
            db,
            StoreSettings(table=spec.table),
            dim=embedder.dim,
            embedder_id=embedder.identity,
        )
        journal: Journal = (
            RemovalJournal(db / f".{spec.table}.removed.jsonl")
            if isinstance(db, Path)
            else TableJournal(store.db, f"_{spec.table}_removed")
        )
        pending = journal.pending()
        states = store.doc_states()
        todo, seen = _plan(scan, states, pipeline_id, settings, report)
        # Sources of skipped files and folders: --sync keeps what they stored before.
        protected = [os.path.abspath(s.path) for s in report.skipped]

        def get_tokens() -> Tokens:  # called by the producer on its first document to chunk
            return tokens if tokens is not None else load_tokens(folder)  # type: ignore[arg-type]

        make_producer: Callable[..., Any] = DocumentProducer
        if spec.engine == "ray":
            from ingest.ray_engine import ray_source_factory

            source = tokens if tokens is not None else folder
            assert source is not None
            make_producer = ray_source_factory(source, settings.embedder, spec.ray_address)
        producer = make_producer(todo, states, pipeline_id, settings, get_tokens)
        _consume(
            producer, store, embedder, tok_id, journal, settings, report, seen, protected, states,
            progress,
        )  # fmt: skip
        if spec.sync:
            _sync(scan, states, seen, protected, store, journal, report)
        still_there = store.existing_chunk_ids(pending)
        report.removed_chunk_ids += [c for c in pending if c not in still_there]
        report.removed_chunk_ids = sorted(set(report.removed_chunk_ids))
        report.maintenance = store.maintain(compact=_should_compact(store, report, settings))
        report.total_chunks = store.count()
        if on_removed is not None and report.removed_chunk_ids:
            on_removed(report.removed_chunk_ids)
        journal.clear()
    report.elapsed_s = time.perf_counter() - start
    return report


def _pipeline_id(settings: IngestSettings, tokenizer_id: str, embedder_id: str) -> str:
    # Everything that shapes chunks or vectors: a change re-ingests every document.
    parts = [PIPELINE_VERSION, json.dumps(asdict(settings.chunk), sort_keys=True)]
    return hashlib.sha256("\0".join([*parts, tokenizer_id, embedder_id]).encode()).hexdigest()[:16]


def _plan(
    scan: Scan,
    states: dict[str, DocState],
    pipeline_id: str,
    settings: IngestSettings,
    report: JobReport,
) -> tuple[list[FileRef], set[str]]:
    """Files that need work, and the doc ids already known to be current."""
    todo: list[FileRef] = []
    seen: set[str] = set()
    for ref in scan.files:
        try:
            size = ref.path.stat().st_size
            if size > settings.max_file_bytes:
                limit = settings.max_file_bytes / 2**20
                report.skipped.append(
                    Skipped(
                        ref.source,
                        f"{size / 2**20:.1f} MB is over the {limit:.0f} MB limit "
                        "(raise it with --max-file-mb)",
                    )  # fmt: skip
                )
                continue
            if is_multi_document(ref.path):
                todo.append(ref)
                continue
            fingerprint = content_fingerprint(ref.path, ref.path.read_bytes())
        except OSError as exc:
            report.skipped.append(Skipped(ref.source, f"cannot read: {exc.strerror or exc}"))
            continue
        state = states.get(ref.doc_id)
        if state and state.is_complete(doc_version(pipeline_id, fingerprint)):
            seen.add(ref.doc_id)
            report.unchanged += 1
        else:
            todo.append(ref)
    return todo, seen


def _consume(
    producer: Any,  # DocumentProducer, or ingest.ray_engine.RayDocumentSource
    store: ChunkStore,
    embedder: Embedder,
    tokenizer_id: str,
    journal: Journal,
    settings: IngestSettings,
    report: JobReport,
    seen: set[str],
    protected: list[str],
    states: dict[str, DocState],
    show_progress: bool,
) -> None:
    """Embed and commit what the producer yields, a batch of whole documents per commit.
    Adds to `seen` the documents met and to `protected` the sources --sync must keep."""
    bar = Progress(len(producer.todo), show_progress)
    batch: list[DocWork] = []
    files_waiting = 0

    def flush() -> None:
        nonlocal batch, files_waiting
        if not batch:
            return
        texts = [c.text for w in batch for c in w.chunks]
        t0 = time.perf_counter()
        if all(w.vectors is not None for w in batch):  # embedded upstream (the Ray engine)
            vectors = np.concatenate([w.vectors for w in batch if w.vectors is not None])
        else:
            vectors = embedder.embed(texts)
        report.embed_s += time.perf_counter() - t0
        rows = build_rows(
            [(w.doc, w.version, w.chunks, w.ids) for w in batch],
            vectors,
            tokenizer_id,
            store.table.schema,
        )
        removed = [c for w in batch for c in _removed(states.get(w.doc.doc_id), w.ids)]
        journal.record(removed)
        store.replace_docs(rows, [w.doc.doc_id for w in batch])
        for w in batch:
            (report.updated if w.doc.doc_id in states else report.added).append(w.doc.doc_id)
        report.removed_chunk_ids += removed
        report.chunks_written += len(texts)
        bar.advance(files_waiting, len(texts))
        batch, files_waiting = [], 0

    producer.start()
    try:
        n_chunks = 0
        for item in producer.drain():
            if item is END:
                break
            kind: str
            payload: Any
            kind, payload = item  # type: ignore[misc]
            if kind == "error":
                raise payload
            if kind == "skip":
                report.skipped.append(payload[0])
                protected.append(payload[1])
            elif kind == "same":
                seen.add(payload)
                report.unchanged += 1
            elif kind == "guess":
                report.guessed_encodings.append(payload)
            elif kind == "doc":
                seen.add(payload.doc.doc_id)
                batch.append(payload)
                n_chunks += len(payload.chunks)
            elif kind == "file":
                if batch:
                    files_waiting += 1
                else:
                    bar.advance(1, 0)
            if n_chunks >= settings.write_batch_chunks:
                flush()
                n_chunks = 0
        flush()
    finally:
        producer.stop.set()
        bar.close()


def _removed(state: DocState | None, new_ids: list[str]) -> list[str]:
    if state is None:
        return []
    keep = set(new_ids)
    return [c for c in state.chunk_ids if c not in keep]


def _sync(
    scan: Scan,
    states: dict[str, DocState],
    seen: set[str],
    protected: list[str],
    store: ChunkStore,
    journal: Journal,
    report: JobReport,
) -> None:
    """Delete stored documents the scan covered but did not find; skipped files are kept."""

    def is_protected(source: str) -> bool:
        return any(source == p or source.startswith((p + "/", p + "#")) for p in protected)

    gone = sorted(
        d
        for d, st in states.items()
        if d not in seen and scan.covers(st.source) and not is_protected(st.source)
    )
    if not gone:
        return
    removed = [c for d in gone for c in states[d].chunk_ids]
    journal.record(removed)
    store.delete_docs(gone)
    report.deleted += gone
    report.removed_chunk_ids += removed


def _should_compact(store: ChunkStore, report: JobReport, settings: IngestSettings) -> bool:
    changed = report.chunks_written + len(report.removed_chunk_ids)
    if not changed:
        return False
    fragments = store.table.stats()["fragment_stats"]["num_fragments"]
    return changed >= settings.compact_after_rows or fragments >= settings.compact_after_fragments


@contextmanager
def _job_lock(db: StoreLocation, table: str) -> Iterator[None]:
    """One writer per table. A local folder: flock, released by the kernel when the holder dies,
    even by SIGKILL. An object store: a lease table (`ingest.lease`), taken over once expired."""
    if not isinstance(db, Path):
        with table_lease(connect(db), table, str(db)):
            yield
        return
    path = db / f".{table}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StoreBusyError(
                f"another ingest job is writing table {table!r} in {db}",
                hint="retry when it has finished, or ingest into another --table",
            ) from exc
        yield
    finally:
        os.close(fd)
