"""A write-ahead list of chunk ids a commit is about to remove.

Written (and fsynced) before each commit that removes chunks, read back by the next job: if a job is
killed after its commit but before its report, the rerun still reports those ids, so the KV cache
never misses an invalidation. Cleared once a job has reported them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


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
