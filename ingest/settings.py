"""Settings of an ingest job, one frozen dataclass with defaults (flags override them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.chunker import ChunkSettings
from ragcache.embedder import EmbedderSettings

# Bumped whenever a loader or the chunker changes its output: stored documents then re-ingest.
PIPELINE_VERSION = "1"


@dataclass(frozen=True)
class IngestSettings:
    chunk: ChunkSettings = field(default_factory=ChunkSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    # Files over this are skipped with a reason: 16 MB of text is ~20k chunks, ~10 min of
    # embedding on 2 CPU cores, and one commit must hold a whole document.
    max_file_bytes: int = 16 * 1024 * 1024
    # Chunks per embedding call and per commit. sentence-transformers sorts each call by length
    # before batching: on python_docs a 256-chunk window pads to 19% more tokens than one sorted
    # pass over all chunks, 1024 to 4.5% (measured). A kill loses at most one window (~35 s here).
    write_batch_chunks: int = 1024
    # Compact after a job that wrote this many rows, or when the table has this many fragments.
    compact_after_rows: int = 1000
    compact_after_fragments: int = 16
