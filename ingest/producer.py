"""The ingest job's producer thread: read, parse and chunk files while the main thread embeds.

Torch releases the GIL while it encodes, so parsing and tokenizing here overlap with embedding,
and the embedder never waits on them (measured: under 2% of a full job outside `embed`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ingest.chunker import Chunk, Tokens, chunk_sections
from ingest.documents import Document, GuessedEncoding, SkipFile, Skipped
from ingest.formats import FileRef, content_fingerprint, load_documents
from ingest.rows import chunk_ids, doc_version
from ingest.settings import IngestSettings
from ragcache.store import DocState

log = logging.getLogger(__name__)

END = object()  # the last item a producer hands over


@dataclass
class DocWork:
    """A document to (re)write: its version hash, chunks and chunk ids (and their vectors, where
    an engine embedded them before they reached the committing thread)."""

    doc: Document
    version: str
    chunks: list[Chunk]
    ids: list[str]
    vectors: np.ndarray | None = None


def file_items(
    ref: FileRef,
    states: dict[str, DocState],
    pipeline_id: str,
    settings: IngestSettings,
    get_tokens: Callable[[], Tokens],
) -> Iterator[tuple[str, object]]:
    """What one file gives the job: ("skip", (Skipped, source)), ("guess", GuessedEncoding),
    ("same", doc_id) for a document stored at this version, ("doc", DocWork) to write.

    A file that cannot be read or parsed is a skip with its reason, never an error: one odd file
    must not stop the job. Shared by the local producer thread and the Ray engine's tasks.
    """
    try:
        data = ref.path.read_bytes()
        loaded = load_documents(ref, data, content_fingerprint(ref.path, data))
    except SkipFile as exc:
        yield ("skip", (Skipped(ref.source, exc.reason), ref.source))
        return
    except OSError as exc:
        yield ("skip", (Skipped(ref.source, f"cannot read: {exc.strerror or exc}"), ref.source))
        return
    except Exception as exc:  # a parser bug on one odd file must not stop the job
        log.debug("loader failed on %s", ref.path, exc_info=True)
        reason = f"loader failed: {type(exc).__name__}: {exc}"
        yield ("skip", (Skipped(ref.source, reason), ref.source))
        return
    if loaded.guessed_encoding is not None:
        yield ("guess", GuessedEncoding(ref.source, loaded.guessed_encoding))
    for skipped in loaded.skipped:
        # A bad line may hold a record stored earlier: keep the file's records from --sync.
        yield ("skip", (skipped, ref.source))
    for doc in loaded.documents:
        version = doc_version(pipeline_id, doc.fingerprint)
        state = states.get(doc.doc_id)
        if state and state.is_complete(version):
            yield ("same", doc.doc_id)
            continue
        chunks = chunk_sections(doc.sections, get_tokens(), settings.chunk)
        yield ("doc", DocWork(doc, version, chunks, chunk_ids(doc.doc_id, chunks)))


class DocumentProducer(threading.Thread):
    """Reads, parses and chunks files into a bounded queue of ("doc" | "skip" | "same" | "guess" |
    "file", payload) items, ending with END or ("error", exception)."""

    def __init__(
        self,
        todo: list[FileRef],
        states: dict[str, DocState],
        pipeline_id: str,
        settings: IngestSettings,
        get_tokens: Callable[[], Tokens],
    ) -> None:
        super().__init__(name="ingest-producer", daemon=True)
        self.todo, self.states, self.pipeline_id = todo, states, pipeline_id
        self.settings, self.get_tokens = settings, get_tokens
        self.items: queue.Queue = queue.Queue(maxsize=64)
        self.stop = threading.Event()
        self._tokens: Tokens | None = None

    def run(self) -> None:
        try:
            for ref in self.todo:
                if self.stop.is_set():
                    return
                self._file(ref)
                self._put(("file", ref.doc_id))
            self._put(END)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._put(("error", exc))

    def _file(self, ref: FileRef) -> None:
        for item in file_items(ref, self.states, self.pipeline_id, self.settings, self._get_tokens):
            self._put(item)

    def _get_tokens(self) -> Tokens:
        if self._tokens is None:
            self._tokens = self.get_tokens()
        return self._tokens

    def _put(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def drain(self) -> Iterator[object]:
        while True:
            item = self.items.get()
            yield item
            if item is END or (isinstance(item, tuple) and item[0] == "error"):
                return
