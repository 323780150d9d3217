"""A batch job: read questions, skip what is answered, schedule, run, write one line each.

`BatchJob.run()` works in the calling thread (the CLI); `start()` runs it on a thread of its own
and `status()`, `cancel()`, `wait()` may be called from any thread (the HTTP layer). A cancelled
or killed job loses nothing already written: rerunning it answers only what is missing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ragcache.batch.formats import (
    BadLine,
    BatchRequest,
    Usage,
    answer_record,
    bad_line_record,
    error_record,
    read_requests,
)
from ragcache.batch.modes import Mode, Prepared
from ragcache.batch.output import AnswerLog
from ragcache.batch.runners import Finished, Runner
from ragcache.batch.schedule import SCHEDULES, schedule
from ragcache.errors import InvalidRequestError, RagcacheError
from ragcache.sampling import SamplingParams

STATES = ("pending", "running", "completed", "cancelled", "failed")


class EmptyBatchError(InvalidRequestError):
    """The questions file holds no lines."""


@dataclass(frozen=True)
class BatchSettings:
    schedule: str = "prefix"  # a key of ragcache.batch.schedule.SCHEDULES
    max_tokens: int = 256  # per answer, unless a line sets its own
    temperature: float = 0.0
    speculation: str = "lookup"  # greedy answers draft from their prompt (same tokens)
    chunk_reuse: str = "off"  # "epic": copy chunk K/V computed for earlier questions
    # Hold a request until its leader's prefill is done when they share at least this many
    # tokens: restoring them then beats computing them concurrently in the batch.
    wait_min_tokens: int = 64
    fsync: bool = True  # each answer on disk before the next: a crash loses none
    progress: bool = False  # a tqdm bar on stderr

    def validate(self) -> BatchSettings:
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError(
                f"unknown schedule {self.schedule!r}", hint="one of: " + ", ".join(SCHEDULES)
            )
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature).validate()
        return self


@dataclass(frozen=True)
class BatchStatus:
    """A snapshot of the job, safe to hand to another thread."""

    state: str  # one of STATES
    total: int  # non-blank input lines
    skipped: int  # answered by an earlier run
    to_run: int  # questions this run tries
    answered: int
    failed: int  # questions that got an error line (retried by a rerun)
    input_errors: int  # bad lines and duplicate ids (not retried)
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    elapsed_s: float
    eta_s: float | None
    error: str | None = None  # why the job failed, when state is "failed"

    @property
    def done(self) -> int:
        return self.answered + self.failed

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "done": self.done, "hit_rate": round(self.hit_rate, 4)}


@dataclass
class _Counts:
    total: int = 0
    skipped: int = 0
    to_run: int = 0
    answered: int = 0
    failed: int = 0
    input_errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    run_started: float | None = None  # perf_counter when answering began
    run_done: int = 0  # finished since answering began (the ETA's rate)
    finished: list[Finished] = field(default_factory=list)


def read_entries(questions: Path) -> list[BatchRequest | BadLine]:
    """Parse a questions file. Raises InvalidRequestError (unreadable), EmptyBatchError."""
    try:
        text = Path(questions).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read the questions file {questions}: {exc.strerror or exc}"
        ) from None
    entries = list(read_requests(text.splitlines()))
    if not entries:
        raise EmptyBatchError(
            f"the questions file {questions} has no questions",
            hint='write one JSON object per line, e.g. {"id": "q1", "question": "..."}',
        )
    return entries


def preflight(questions: Path, answers: Path) -> None:
    """Fail fast, before a model loads: the questions readable and not empty, the answers
    file writable. Raises what `read_entries` and `AnswerLog.open` raise."""
    read_entries(questions)
    log, _ = AnswerLog.open(answers, fsync=False)
    log.close()


class BatchJob:
    """One batch over one questions file and one answers file."""

    def __init__(
        self,
        questions: Path,
        answers: Path,
        mode: Mode,
        runner: Runner,
        settings: BatchSettings | None = None,
    ) -> None:
        self.questions = Path(questions)
        self.answers = Path(answers)
        self.mode = mode
        self.runner = runner
        self.settings = (settings or BatchSettings()).validate()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._state = "pending"
        self._error: str | None = None
        self._started = time.perf_counter()
        self._ended: float | None = None
        self._thread: threading.Thread | None = None
        self._bar = None

    # -- control from any thread --------------------------------------------------------------
    def start(self) -> None:
        """Run the job on a new thread; errors end up in `status().error`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run_quietly, name="ragcache-batch", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        """Stop starting questions and cancel running ones; what was written stays. Idempotent."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> BatchStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def status(self) -> BatchStatus:
        with self._lock:
            c = self._counts
            end = self._ended or time.perf_counter()
            eta = None
            if c.run_started is not None and c.run_done and self._state == "running":
                rate = c.run_done / (time.perf_counter() - c.run_started)
                eta = (c.to_run - c.answered - c.failed) / rate if rate > 0 else None
            return BatchStatus(
                state=self._state,
                total=c.total,
                skipped=c.skipped,
                to_run=c.to_run,
                answered=c.answered,
                failed=c.failed,
                input_errors=c.input_errors,
                prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens,
                generated_tokens=c.generated_tokens,
                elapsed_s=round(end - self._started, 3),
                eta_s=None if eta is None else round(eta, 1),
                error=self._error,
            )

    # -- the run ------------------------------------------------------------------------------
    def _run_quietly(self) -> None:
        with contextlib.suppress(Exception):  # recorded in status().error by run()
            self.run()

    def run(self) -> BatchStatus:
        """Answer every question not yet answered; return the final status.

        Raises EmptyBatchError, OutputNotWritableError or InvalidRequestError (unreadable input)
        before answering anything; a failing question only gets an error line.
        """
        self._started = time.perf_counter()
        self._set_state("running")
        try:
            self._run()
        except KeyboardInterrupt:
            self.cancel()
            self._set_state("cancelled")
            raise
        except BaseException as exc:
            with self._lock:
                self._error = str(exc) if isinstance(exc, RagcacheError) else repr(exc)
            self._set_state("failed")
            raise
        self._set_state("cancelled" if self._cancel.is_set() else "completed")
        return self.status()

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
            if state in ("completed", "cancelled", "failed"):
                self._ended = time.perf_counter()

    def _run(self) -> None:
        entries = read_entries(self.questions)
        log, resumed = AnswerLog.open(self.answers, fsync=self.settings.fsync)
        with log:
            requests = [e for e in entries if isinstance(e, BatchRequest)]
            todo = [r for r in requests if r.id not in resumed.answered]
            with self._lock:
                self._counts.total = len(entries)
                self._counts.skipped = len(requests) - len(todo)
                self._counts.to_run = len(todo)
            for bad in (e for e in entries if isinstance(e, BadLine)):
                with self._lock:
                    self._counts.input_errors += 1
                if bad.line not in resumed.input_error_lines:
                    log.append(bad_line_record(bad))
            items = self._prepare(todo, log)
            if self._cancel.is_set() or not items:
                return
            self._answer(items, log)

    def _params(self, request: BatchRequest) -> SamplingParams:
        s = self.settings
        return SamplingParams(
            max_tokens=request.max_tokens or s.max_tokens,
            temperature=s.temperature,
            speculation=s.speculation,
            chunk_reuse=s.chunk_reuse,
        )

    def _prepare(self, todo: list[BatchRequest], log: AnswerLog) -> list[Prepared]:
        items = []
        for request in todo:
            if self._cancel.is_set():
                break
            try:
                items.append(self.mode.prepare(request, self._params(request)))
            except Exception as exc:  # retrieval or prompt trouble: this question only
                self._failed(log, request, exc)
        return items

    def _answer(self, items: list[Prepared], log: AnswerLog) -> None:
        slots = schedule([it.segment_keys() for it in items], self.settings.schedule)
        position = {s.index: p for p, s in enumerate(slots)}
        ordered: list[Prepared] = []
        wait_for: list[int | None] = []
        for slot in slots:
            item = items[slot.index]
            shared = item.shared_tokens(slot.shared_segments)
            worth = slot.leader is not None and shared >= self.settings.wait_min_tokens
            wait_for.append(position[slot.leader] if worth and slot.leader is not None else None)
            ordered.append(replace(item, wait_tokens=shared if worth else 0))
        bar = self._progress(len(ordered))
        with self._lock:
            self._counts.run_started = time.perf_counter()
        try:
            on_done = lambda f: self._done(f, log, bar)  # noqa: E731
            self.runner.run(ordered, wait_for, on_done, self._cancel, self.mode.refresh)
        finally:
            if bar is not None:
                bar.close()

    def _progress(self, total: int):
        if not self.settings.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, unit="q", desc="batch", dynamic_ncols=True)

    def _done(self, finished: Finished, log: AnswerLog, bar) -> None:
        request = finished.item.request
        if log.closed:
            return  # the run was interrupted; a rerun answers it
        if finished.cancelled or (finished.error is not None and self._cancel.is_set()):
            return  # not written: a rerun answers it
        if finished.error is not None:
            self._failed(log, request, finished.error)
        else:
            completion = finished.completion
            assert completion is not None
            try:
                answer = self.mode.finish(finished.item, completion, finished.started)
            except Exception as exc:
                self._failed(log, request, exc)
                return self._tick(bar)
            s = completion.stats
            usage = Usage(s.prompt_tokens, s.cached_tokens, s.recomputed_tokens, s.generated_tokens)
            log.append(
                answer_record(request, answer.text, answer.citations, usage, s.finish_reason)
            )
            with self._lock:
                c = self._counts
                c.answered += 1
                c.prompt_tokens += s.prompt_tokens
                c.cached_tokens += s.cached_tokens
                c.generated_tokens += s.generated_tokens
                c.finished.append(finished)
        self._tick(bar)

    def _tick(self, bar) -> None:
        with self._lock:
            self._counts.run_done += 1
        if bar is not None:
            status = self.status()
            bar.set_postfix(hit=f"{status.hit_rate:.0%}", errors=status.failed, refresh=False)
            bar.update(1)

    def _failed(self, log: AnswerLog, request: BatchRequest, exc: BaseException) -> None:
        hint = exc.hint if isinstance(exc, RagcacheError) else None
        message = exc.message if isinstance(exc, RagcacheError) else repr(exc)
        log.append(error_record(request.line, request.id, type(exc).__name__, message, hint))
        with self._lock:
            self._counts.failed += 1

    def finished(self) -> list[Finished]:
        """The completions of this run (for benchmarks and tests), in the order they ended."""
        with self._lock:
            return list(self._counts.finished)
