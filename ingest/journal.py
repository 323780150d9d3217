"""A write-ahead list of chunk ids a commit is about to remove.

Written (and fsynced) before each commit that removes chunks, read back by the next job: if a job is
killed after its commit but before its report, the rerun still reports those ids, so the KV cache
never misses an invalidation. Cleared once a job has reported them. A local store keeps it as a
file beside the table; a store on object storage as a table of its own (`TableJournal`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa


class RemovalJournal:
    """Append-only JSON lines of chunk ids under the store folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pending(self) -> list[str]:
        """Ids written by jobs that did not finish; a torn last line (killed mid-write) is ignored."""
        if not self.path.exists():
            return []
        ids: list[str] = []
        for line in self.path.read_text().splitlines():
            try:
                ids.extend(json.loads(line))
            except json.JSONDecodeError:
                continue
        return ids

    def record(self, chunk_ids: Iterable[str]) -> None:
        ids = list(chunk_ids)
        if not ids:
            return
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # end a line torn by a kill, so this record parses on its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(json.dumps(ids).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class TableJournal:
    """The same journal as a small LanceDB table beside the chunk table, for stores on object
    storage (no local file the next job is sure to see). A record is one committed row, so a
    killed job leaves whole records or none."""

    def __init__(self, db: Any, name: str) -> None:
        self.db = db
        self.name = name

    def _table(self) -> Any | None:
        try:
            return self.db.open_table(self.name)
        except ValueError as exc:  # lancedb's "Table 'x' was not found"
            if "not found" in str(exc):
                return None
            raise

    def pending(self) -> list[str]:
        table = self._table()
        if table is None:
            return []
        rows = table.search().select(["ids"]).limit(None).to_arrow()["ids"].to_pylist()
        return [i for row in rows for i in row]

    def record(self, chunk_ids: Iterable[str]) -> None:
        ids = list(chunk_ids)
        if not ids:
            return
        data = pa.table({"ids": pa.array([ids], pa.list_(pa.string()))})
        table = self._table()
        if table is None:
            self.db.create_table(self.name, data)
        else:
            table.add(data)

    def clear(self) -> None:
        if self._table() is not None:
            self.db.drop_table(self.name)


Journal = RemovalJournal | TableJournal
