"""Batch jobs of the service: one folder each under the batches folder, run on the shared worker.

A job's folder holds `questions.jsonl` (the upload, as received) and `answers.jsonl` (written line
by line by `ragcache.batch.BatchJob`). Ids are uuid4 hex made here; a lookup accepts nothing else,
so an id never names a path outside the batches folder. Jobs live in memory: a restarted service
lists none (their folders stay on disk).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragcache.batch import (
    BatchJob,
    BatchSettings,
    BatchStatus,
    Document,
    LongContextMode,
    RagMode,
    WorkerRunner,
)
from ragcache.batch.formats import BatchRequest
from ragcache.batch.job import preflight, read_entries
from ragcache.batch.modes import Mode
from ragcache.errors import InvalidRequestError
from serve.errors import LimitExceededError, NotFoundError
from serve.schemas import BatchOut
from serve.settings import ServeSettings

if TYPE_CHECKING:
    from serve.services import Services

_ID = re.compile(r"[0-9a-f]{32}")
QUESTIONS = "questions.jsonl"
ANSWERS = "answers.jsonl"


@dataclass(frozen=True)
class BatchOptions:
    max_tokens: int | None = None
    k: int | None = None
    order: str | None = None


@dataclass
class BatchEntry:
    id: str
    folder: Path
    job: BatchJob
    mode: str
    created_at: int

    @property
    def answers(self) -> Path:
        return self.folder / ANSWERS

    def out(self, status: BatchStatus | None = None) -> BatchOut:
        status = status or self.job.status()
        return BatchOut(
            id=self.id,
            status=status.state,
            mode=self.mode,
            created_at=self.created_at,
            progress=status.as_dict(),
        )

    def output(self) -> bytes:
        """The answers written so far, whole lines only."""
        try:
            data = self.answers.read_bytes()
        except FileNotFoundError:
            return b""
        return data[: data.rfind(b"\n") + 1]


class BatchManager:
    """The service's batch jobs. `create` blocks (parsing, tokenizing): call it off the loop."""

    def __init__(self, root: Path, settings: ServeSettings) -> None:
        self.root = root
        self.settings = settings
        self._jobs: dict[str, BatchEntry] = {}
        self._lock = threading.Lock()
        self._closed = False

    def create(
        self,
        services: Services,
        questions: bytes,
        docs: Sequence[Document],
        options: BatchOptions,
    ) -> BatchEntry:
        """Store the upload, check it, start the job. Raises EmptyBatchError (400),
        InvalidRequestError (400), LimitExceededError (422), PromptTooLongError (413)."""
        max_tokens = self._check(options)
        id = uuid.uuid4().hex
        folder = self.root / id
        folder.mkdir(parents=True)
        try:
            questions_path = folder / QUESTIONS
            questions_path.write_bytes(questions)
            preflight(questions_path, folder / ANSWERS)
            self._check_lines(questions_path)
            mode: Mode
            if docs:
                mode = LongContextMode(services.stack.loaded, docs)
            else:
                mode = RagMode(services.stack.answerer, options.k, options.order, None)
            worker = services.worker
            job = BatchJob(
                questions_path,
                folder / ANSWERS,
                mode,
                WorkerRunner(worker, max_in_flight=worker.settings.max_batch),
                BatchSettings(schedule="prefix", max_tokens=max_tokens, progress=False),
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        entry = BatchEntry(id, folder, job, mode.name, int(time.time()))
        with self._lock:
            if self._closed:
                shutil.rmtree(folder, ignore_errors=True)
                raise InvalidRequestError("the service is shutting down")
            self._jobs[id] = entry
            job.start()
        return entry

    def _check(self, options: BatchOptions) -> int:
        s = self.settings
        if options.max_tokens is not None and options.max_tokens > s.max_tokens:
            raise LimitExceededError(
                f"max_tokens is {options.max_tokens} but this server generates at most {s.max_tokens}"
            )
        if options.k is not None and options.k > s.max_k:
            raise LimitExceededError(
                f"k is {options.k} but this server retrieves at most {s.max_k}"
            )
        return options.max_tokens or min(s.default_max_tokens or s.max_tokens, s.max_tokens)

    def _check_lines(self, questions: Path) -> None:
        # A line's own max_tokens must respect the server's limit too.
        for entry in read_entries(questions):
            if (
                isinstance(entry, BatchRequest)
                and (entry.max_tokens or 0) > self.settings.max_tokens
            ):
                raise LimitExceededError(
                    f"line {entry.line} asks for max_tokens {entry.max_tokens} but this server "
                    f"generates at most {self.settings.max_tokens}"
                )

    def get(self, id: str) -> BatchEntry:
        """The job `id`; raises NotFoundError (404) for an unknown or malformed id."""
        entry = self._jobs.get(id) if _ID.fullmatch(id) else None
        if entry is None:
            raise NotFoundError(f"no batch with id {id[:64]!r}")
        return entry

    def list(self) -> list[BatchEntry]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda e: e.created_at, reverse=True)

    def close(self, timeout_s: float) -> None:
        """Cancel every job and wait (up to `timeout_s` in all) for them to stop writing."""
        with self._lock:
            self._closed = True
            entries = list(self._jobs.values())
        for entry in entries:
            entry.job.cancel()
        deadline = time.monotonic() + timeout_s
        for entry in entries:
            entry.job.wait(max(0.0, deadline - time.monotonic()))


def documents(texts: Sequence[Any]) -> list[Document]:
    """Long-context documents from `(name, text)` pairs; raises InvalidRequestError for an empty one."""
    docs = []
    for name, text in texts:
        if not text.strip():
            raise InvalidRequestError(f"document {name!r} is empty")
        docs.append(Document(name, text))
    return docs
