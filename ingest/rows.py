"""Chunk ids, document version hashes, and the Arrow rows written to the store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from ingest.chunker import Chunk
from ingest.documents import Document


def doc_version(pipeline_id: str, fingerprint: str) -> str:
    """Hash of a document version: its content and everything that shapes its chunks and vectors."""
    return hashlib.sha256(f"{pipeline_id}\0{fingerprint}".encode()).hexdigest()[:24]


def chunk_ids(doc_id: str, chunks: Sequence[Chunk]) -> list[str]:
    """Ids from the document and the chunk text (and which repeat of that text it is), not its
    position: editing one paragraph keeps the ids, and so the KV-cache entries, of the others."""
    seen: dict[str, int] = {}
    out = []
    for chunk in chunks:
        n = seen.get(chunk.text, 0)
        seen[chunk.text] = n + 1
        out.append(hashlib.sha256(f"{doc_id}\0{chunk.text}\0{n}".encode()).hexdigest()[:24])
    return out


def build_rows(
    docs: Sequence[tuple[Document, str, list[Chunk], list[str]]],
    vectors: np.ndarray,
    tokenizer_id: str,
    schema: pa.Schema,
) -> pa.Table:
    """Rows for (document, version hash, chunks, chunk ids) in order; `vectors` row-aligned."""
    cols: dict[str, list] = {f.name: [] for f in schema}
    now = datetime.now(UTC)
    for doc, version, chunks, ids in docs:
        meta = json.dumps(doc.metadata, sort_keys=True, default=str)
        for position, (chunk, cid) in enumerate(zip(chunks, ids, strict=True)):
            cols["chunk_id"].append(cid)
            cols["doc_id"].append(doc.doc_id)
            cols["source"].append(doc.source)
            cols["title"].append(doc.title)
            cols["heading_path"].append(list(chunk.heading_path))
            cols["position"].append(position)
            cols["text"].append(chunk.text)
            cols["n_tokens"].append(len(chunk.token_ids))
            cols["content_hash"].append(hashlib.sha256(chunk.text.encode()).hexdigest()[:16])
            cols["doc_hash"].append(version)
            cols["doc_chunks"].append(len(chunks))
            cols["metadata"].append(meta)
            cols["token_ids"].append(list(chunk.token_ids))
            cols["tokenizer_id"].append(tokenizer_id)
            cols["ingested_at"].append(now)
    dim = schema.field("vector").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    arrays = [
        pa.FixedSizeListArray.from_arrays(flat, dim)
        if f.name == "vector"
        else pa.array(cols[f.name], type=f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)
