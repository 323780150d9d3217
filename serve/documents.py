"""Documents over HTTP: uploads become files in the uploads folder and go through the ingest job;
deleting a document also drops the KV cache entries that hold its chunks.

Names are checked, never cleaned up: an upload name is one plain file name (no separators, no
`..`, no leading dot) and a document id reaches the filesystem only when it is such a name. Callers
hold the app's ingest lock, so one job or delete runs at a time, and run these off the event loop.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ingest.formats import is_supported
from ingest.pipeline import JobSpec, run_job
from ragcache.errors import InvalidRequestError
from ragcache.store import in_list, sql_quote
from ragcache.store_watch import chunk_tokens
from serve.errors import NotFoundError
from serve.schemas import DeletedDocument, DocumentInfo, DocumentList, IngestResult, SkippedOut
from serve.services import Services

_NAME = re.compile(r"^\w[\w .\-]{0,199}$")  # \w is Unicode-aware: résumé.md is fine
SUPPORTED = ".txt .md .rst .html .pdf .jsonl"


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


def check_name(name: str) -> str:
    """Return `name` if it is a safe, supported upload file name. Raises InvalidRequestError."""
    if not _NAME.match(name) or ".." in name or name != name.strip():
        raise InvalidRequestError(
            f"{name[:80]!r} is not a plain file name",
            hint="use letters, digits, '_', '-', '.', spaces; no folders or '..'",
        )
    if not is_supported(Path(name)):
        raise InvalidRequestError(
            f"{name!r} has an unsupported format", hint=f"one of: {SUPPORTED}"
        )
    return name


def _upload_path(services: Services, doc_id: str) -> Path | None:
    """The uploaded file behind `doc_id`, if the id is a plain name inside the uploads folder."""
    if not _NAME.match(doc_id) or ".." in doc_id:
        return None
    root = services.uploads_dir.resolve()
    path = (root / doc_id).resolve()
    return path if path.parent == root else None


def _chunk_spans(services: Services, where: str) -> dict[str, list[int]]:
    """chunk_id -> the chunk's token ids under the served model's tokenizer, as prompts hold them."""
    stack = services.stack
    rows = (
        stack.store.table.search()
        .where(where)
        .select(["chunk_id", "text", "token_ids", "tokenizer_id"])
        .limit(None)
        .to_arrow()
        .to_pylist()
    )
    tokenizer, own_id = stack.loaded.tokenizer, stack.answerer.tokenizer_id

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return {r["chunk_id"]: chunk_tokens(r, tokenize, own_id) for r in rows}


def _invalidate(services: Services, spans: Sequence[Sequence[int]]) -> int:
    cache = services.stack.cache
    if cache is None or not spans:
        return 0
    return services.worker.call(lambda: cache.invalidate(spans))


def ingest_uploads(
    services: Services, uploads: Sequence[Upload], home: Path, table: str
) -> IngestResult:
    """Write the uploads and run one ingest job over them. A replaced document's old chunks lose
    their cached KV. Raises InvalidRequestError (bad or repeated names), StoreError."""
    names = [check_name(u.name) for u in uploads]
    if len(set(names)) != len(names):
        raise InvalidRequestError("the same file name appears twice in one upload")
    paths = []
    for upload in uploads:
        path = services.uploads_dir / upload.name
        tmp = services.uploads_dir / f".{upload.name}.{uuid.uuid4().hex}.part"
        tmp.write_bytes(upload.data)
        os.replace(tmp, path)  # a reader never sees half a file
        paths.append(str(path))
    # Old token ids must be read before the job replaces the rows that hold them.
    where = " OR ".join(
        [in_list("doc_id", names)] + [f"doc_id LIKE {sql_quote(n + '#%')}" for n in names]
    )
    old = _chunk_spans(services, where)
    stack = services.stack
    report = run_job(
        JobSpec(
            paths=tuple(paths),
            db_dir=services.db_dir,
            table=table,
            generator=str(stack.loaded.path),
        ),
        home,
        embedder=stack.retriever.embedder,
    )
    stack.store.table.checkout_latest()  # the job wrote through its own connection
    dropped = _invalidate(services, [old[c] for c in report.removed_chunk_ids if c in old])
    return IngestResult(
        documents=names,
        added=report.added,
        updated=report.updated,
        unchanged=report.unchanged,
        skipped=[SkippedOut(path=Path(s.path).name, reason=s.reason) for s in report.skipped],
        chunks_written=report.chunks_written,
        total_chunks=report.total_chunks,
        kv_nodes_dropped=dropped,
        elapsed_s=round(report.elapsed_s, 3),
    )


def _iso(when: object) -> str | None:
    return when.isoformat(timespec="seconds") if hasattr(when, "isoformat") else None  # type: ignore[attr-defined]


def list_documents(services: Services, offset: int, limit: int) -> DocumentList:
    states = services.stack.store.doc_states()
    ids = sorted(states)
    page = [
        DocumentInfo(
            id=d,
            source=states[d].source,
            chunks=len(states[d].chunk_ids),
            ingested_at=_iso(states[d].ingested_at),
        )
        for d in ids[offset : offset + limit]
    ]
    return DocumentList(documents=page, total=len(ids))


def delete_document(services: Services, doc_id: str) -> DeletedDocument:
    """Delete the document's chunks, their cached KV and, for an upload, its file.

    Raises NotFoundError (404) when the store holds no such document."""
    spans = _chunk_spans(services, f"doc_id = {sql_quote(doc_id)}")
    if not spans:
        raise NotFoundError(f"no document {doc_id[:200]!r}", hint="GET /v1/documents lists them")
    services.stack.store.delete_docs([doc_id])
    dropped = _invalidate(services, list(spans.values()))
    path = _upload_path(services, doc_id)
    removed = False
    if path is not None and path.is_file():
        path.unlink()
        removed = True
    return DeletedDocument(
        id=doc_id, chunks_deleted=len(spans), kv_nodes_dropped=dropped, file_removed=removed
    )
