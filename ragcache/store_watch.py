"""Seeing what other processes commit to the chunk table, and which cached chunks that retires.

A LanceDB handle reads the table version it opened until it is told to look again, so a server
that runs beside ingest jobs (the normal way to run them) must look again itself. Chunk ids are
derived from the document and the chunk's text, so a chunk whose id left the table is a chunk
whose text no prompt will hold again: its KV is dead weight, and a document changed or deleted
must not go on being answered from it. The retired chunks' token ids are read from the table
version that still had them (LanceDB keeps past versions until compaction cleans them up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ragcache.store import ChunkStore


@dataclass(frozen=True)
class StoreChange:
    old_version: int
    new_version: int
    added_chunks: int
    # chunk id -> its token ids as prompts hold them (under the served model's tokenizer)
    removed_chunks: dict[str, list[int]]


def chunk_tokens(
    row: dict[str, Any], tokenize: Callable[[str], list[int]], tokenizer_id: str
) -> list[int]:
    """A stored chunk's token ids under the served tokenizer: the stored ones when they were made
    by it, else the text tokenized the way the answerer tokenizes it."""
    ids = row.get("token_ids")
    if row.get("tokenizer_id") == tokenizer_id and ids:
        return list(ids)
    return list(tokenize(row.get("text") or ""))


class StoreWatcher:
    """Polls one store for new commits; `poll` says what changed since the last one."""

    def __init__(
        self, store: ChunkStore, tokenize: Callable[[str], list[int]], tokenizer_id: str
    ) -> None:
        self.store = store
        self.tokenize = tokenize
        self.tokenizer_id = tokenizer_id
        self.version = store.refresh()
        self._ids = store.chunk_ids()

    def poll(self) -> StoreChange | None:
        """Move the store's handle to the latest commit; None when there was none since the last
        poll. Costs one manifest check when nothing changed, one id column read when it did."""
        version = self.store.refresh()
        if version == self.version:
            return None
        ids = self.store.chunk_ids()
        gone = sorted(self._ids - ids)
        columns = ["chunk_id", "text", "token_ids", "tokenizer_id"]
        rows = self.store.rows_at(self.version, gone, columns)
        removed = {r["chunk_id"]: chunk_tokens(r, self.tokenize, self.tokenizer_id) for r in rows}
        change = StoreChange(self.version, version, len(ids - self._ids), removed)
        self.version, self._ids = version, ids
        return change
