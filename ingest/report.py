"""The job report (what changed, what was skipped and why) and the progress bar a person watches."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

from ingest.documents import GuessedEncoding, Skipped


@dataclass
class JobReport:
    """Filled in as the job runs; `removed_chunk_ids` feeds KV-cache invalidation."""

    db: str
    table: str
    added: list[str] = field(default_factory=list)  # doc ids new to the table
    updated: list[str] = field(default_factory=list)  # doc ids whose chunks were replaced
    deleted: list[str] = field(default_factory=list)  # doc ids removed by --sync
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)  # meant to be read, and could not be
    ignored: list[Skipped] = field(default_factory=list)  # of kinds ingest never reads (.css, .png)
    guessed_encodings: list[GuessedEncoding] = field(default_factory=list)  # ingested, not UTF-8
    chunks_written: int = 0
    removed_chunk_ids: list[str] = field(default_factory=list)
    maintenance: list[str] = field(default_factory=list)
    total_chunks: int = 0  # rows in the table after the job
    elapsed_s: float = 0.0
    embed_s: float = 0.0

    @property
    def partial(self) -> bool:
        """True when something ingest reads was left out: the CLI exits with EXIT_PARTIAL.
        Ignored files (kinds ingest never reads) and guessed encodings do not make a job partial."""
        return bool(self.skipped)

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_written / self.elapsed_s if self.elapsed_s else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(partial=self.partial, chunks_per_s=round(self.chunks_per_s, 2))
        return data

    def summary(self) -> str:
        lines = [
            f"ingest into {self.db} (table {self.table}) in {self.elapsed_s:.1f} s: "
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.deleted)} deleted, "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped, {len(self.ignored)} ignored",
            f"  {self.chunks_written} chunks written ({self.chunks_per_s:.1f}/s), "
            f"{len(self.removed_chunk_ids)} chunk ids removed, {self.total_chunks} chunks stored",
        ]
        lines += [f"  {m}" for m in self.maintenance]
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        lines += [
            f"  guessed encoding {g.encoding} for {g.path} (not UTF-8: check that it reads right)"
            for g in self.guessed_encodings
        ]
        if self.ignored:
            # Grouped: a site folder may hold thousands of images; --json lists every path.
            kinds = Counter(PurePath(i.path).suffix.lower() or "(no suffix)" for i in self.ignored)
            counts = ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items()))
            lines.append(
                f"  ignored {len(self.ignored)} files of kinds ingest does not read: {counts}"
            )
        return "\n".join(lines)


class Progress:
    """A tqdm bar over documents, with chunks and chunks/s; silent when disabled."""

    def __init__(self, total_docs: int, enabled: bool) -> None:
        self._bar = None
        self._start = time.perf_counter()
        self._chunks = 0
        if enabled and total_docs:
            from tqdm import tqdm

            self._bar = tqdm(total=total_docs, unit="doc", file=sys.stderr, dynamic_ncols=True)

    def advance(self, docs: int, chunks: int) -> None:
        self._chunks += chunks
        if self._bar is not None:
            rate = self._chunks / max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"{self._chunks} chunks, {rate:.1f} chunks/s", refresh=False)
            self._bar.update(docs)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
