"""One model worker: a thread that owns MLX, the engine and its prefix cache.

Requests reach it through a bounded queue. Each request restores its own prefix from the cache and
prefills the rest in steps (interleaved with the others' decoding, so a long prompt never stalls
running streams); its final prompt piece then joins mlx-lm's `BatchGenerator`, which decodes every
running request as one batch. When a request ends, its KV goes back into the cache.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from ragcache.engine import Completion, Engine, GenerationStats, TextDelta, _cache_offset
from ragcache.errors import RagcacheError
from ragcache.loop_guard import LoopGuard
from ragcache.sampling import SamplingParams, StopMatcher, make_request_sampler
from ragcache.segments import SegmentedPrompt

log = logging.getLogger(__name__)
T = TypeVar("T")
Event = TextDelta | Completion


@dataclass(frozen=True)
class WorkerSettings:
    max_queue: int = 64  # requests waiting or running; beyond that submit() refuses
    max_batch: int = 8  # sequences decoded together
    idle_wait_s: float = 0.05


class QueueFullError(RagcacheError):
    """Too many requests in flight; the client should retry later."""

    http_status = 429
    exit_code = 75

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(
            f"the server is busy: {depth} requests are queued or running",
            hint=f"retry in {retry_after_s:.0f} s",
        )
        self.retry_after_s = retry_after_s


class WorkerStoppedError(RagcacheError):
    http_status = 503
    exit_code = 75


_DONE = object()


class _LongLivedThreads:
    """Threads for MLX work that never exit; a finished loop parks its thread for the next one.

    MLX keeps a thread-local compile cache whose destructor takes the GIL when the OS thread
    exits. A thread that exits while the interpreter finalizes aborts the whole process
    ("terminate called without an active exception"), and `Thread.join` returns before those
    destructors run. A parked thread never exits, so its destructors never run.
    """

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[queue.SimpleQueue] = queue.SimpleQueue()

    def submit(self, fn: Callable[[], None], name: str) -> threading.Event:
        try:
            inbox = self._idle.get_nowait()
        except queue.Empty:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(inbox,), daemon=True).start()
        done = threading.Event()
        inbox.put((fn, name, done))
        return done

    def _loop(self, inbox: queue.SimpleQueue) -> None:
        while True:
            fn, name, done = inbox.get()
            threading.current_thread().name = name
            try:
                fn()
            except BaseException:
                log.exception("%s crashed", name)
            finally:
                threading.current_thread().name = "ragcache-idle"
                done.set()
                self._idle.put(inbox)


_THREADS = _LongLivedThreads()


class Ticket:
    """Handle of one submitted request. Thread-safe."""

    def __init__(self, ticket_id: int) -> None:
        self.id = ticket_id
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the generation at its next step; what it computed still goes into the cache."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, item: Any) -> None:
        self._events.put(item)

    def _next(self, timeout: float | None) -> Any:
        item = self._events.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """TextDelta events as text is decoded, then one Completion. Re-raises request errors."""
        while True:
            item = self._next(timeout)
            if item is _DONE:
                return
            yield item

    async def aevents(self) -> AsyncIterator[Event]:
        """The same stream for async code; leaving it early (client gone) cancels the request.

        Polls with a short backoff instead of parking a thread per stream: a hundred waiting
        clients would otherwise hold a hundred threads of anyio's shared pool.
        """
        finished = False
        delay = 0.001
        try:
            while True:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    await anyio.sleep(delay)
                    delay = min(0.02, delay * 2)
                    continue
                delay = 0.001
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                self.cancel()


@dataclass
class _Request:
    ticket: Ticket
    prompt: SegmentedPrompt
    params: SamplingParams
    submitted: float
    session: Any = None
    prompt_cache: list[Any] = field(default_factory=list)
    start: int = 0
    steps: Iterator[int] | None = None
    position: int = 0
    uid: int | None = None
    seen: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    stopper: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    guard: LoopGuard | None = None
    detok: Any = None
    first_token_at: float = 0.0
    prefill_done_at: float = 0.0


class ModelWorker:
    """Runs every generation of one engine on one thread, decoding concurrent requests together."""

    def __init__(self, engine: Engine, settings: WorkerSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or WorkerSettings()
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._active: list[_Request] = []
        self._running: threading.Event | None = None  # set when the loop has ended
        self._thread_id: int | None = None
        self._stopping = threading.Event()
        self._gen: BatchGenerator | None = None
        self._by_uid: dict[int, _Request] = {}
        self.completed = 0
        self.mean_request_s = 5.0  # for Retry-After; updated as requests finish

    # -- public -------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        if self._running is not None:
            return
        self._stopping.clear()
        self._running = _THREADS.submit(self._run, "ragcache-model-worker")

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (cancel them after `timeout`), then
        flush the cache's disk tier. Idempotent."""
        if self._running is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        for req in list(self._active):
            req.ticket.cancel()
        self._running.wait(timeout=max(1.0, deadline - time.monotonic() + 5))
        self._running = None
        self._gen = None
        cache = self.engine.cache
        if cache is not None and hasattr(cache, "flush"):
            cache.flush()

    def submit(self, prompt: SegmentedPrompt, params: SamplingParams | None = None) -> Ticket:
        """Queue a generation. Raises QueueFullError, WorkerStoppedError, PromptTooLongError,
        InvalidRequestError (bad sampling values) before queueing anything."""
        params = (params or SamplingParams()).validate()
        self.engine.check_fits(len(prompt.tokens))
        if self._stopping.is_set() or self._running is None:
            raise WorkerStoppedError("the model worker is not running", hint="retry shortly")
        with self._lock:
            if self._in_flight >= self.settings.max_queue:
                per_slot = self.mean_request_s / max(1, self.settings.max_batch)
                raise QueueFullError(self._in_flight, max(1.0, per_slot * self._in_flight))
            self._in_flight += 1
        ticket = Ticket(next(self._ids))
        self._inbox.put(_Request(ticket, prompt, params, time.perf_counter()))
        return ticket

    def call(self, fn: Callable[[], T], timeout: float | None = 60.0) -> T:
        """Run `fn` on the worker thread between steps and return its result (or raise)."""
        if self._running is None or threading.get_ident() == self._thread_id:
            return fn()
        future: Future = Future()
        self._calls.put((fn, future))
        return future.result(timeout=timeout)

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            self._run_calls()
            self._admit()
            busy = self._prefill_one_step()
            busy = self._decode_one_step() or busy
            self._reap_cancelled()
            if self._stopping.is_set() and not self._active and self._inbox.empty():
                self._run_calls()
                return
            if not busy:
                self._wait_for_work()

    def _wait_for_work(self) -> None:
        try:
            req = self._inbox.get(timeout=self.settings.idle_wait_s)
        except queue.Empty:
            return
        self._start(req)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, not swallowed
                    future.set_exception(exc)

    def _admit(self) -> None:
        while len(self._active) < self.settings.max_batch:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._start(req)

    def _start(self, req: _Request) -> None:
        engine = self.engine
        try:
            tokens = req.prompt.tokens
            cache = engine.cache
            if cache is not None:
                req.session = cache.begin(tokens, req.prompt.boundaries)
                req.prompt_cache, req.start = req.session.prompt_cache, req.session.start
            else:
                from mlx_lm.models.cache import make_prompt_cache

                req.prompt_cache, req.start = make_prompt_cache(engine.loaded.model), 0
            req.steps = engine.prefill_steps(tokens, req.start, req.prompt_cache, req.session)
            req.position = next(req.steps)
            req.stopper = StopMatcher(req.params.stop)
            req.guard = LoopGuard() if req.params.stop_loops else None
            req.detok = engine.loaded.tokenizer.detokenizer
            self._active.append(req)
        except BaseException as exc:
            self._fail(req, exc)

    def _prefill_one_step(self) -> bool:
        """Do one prefill step (the oldest request still prefilling) between decode steps.

        Requests whose prefill is done join the batch in the same pass, so requests that arrive
        together start decoding together.
        """
        busy = False
        for req in list(self._active):
            if req.uid is not None or req.steps is None:
                continue
            try:
                req.position = next(req.steps)
                return True
            except StopIteration:
                req.steps = None
                req.prefill_done_at = time.perf_counter()
                self._join_batch(req)
                busy = True
            except BaseException as exc:
                self._fail(req, exc)
                busy = True
        return busy

    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            eos = [[t] for t in self.engine.loaded.eos_token_ids]
            self._gen = BatchGenerator(
                self.engine.loaded.model,
                stop_tokens=eos,
                completion_batch_size=self.settings.max_batch,
                prefill_batch_size=self.settings.max_batch,
                prefill_step_size=max(2, self.engine.settings.prefill_step_size),
                stream=mx.default_stream(mx.default_device()),
            )
        return self._gen

    def _join_batch(self, req: _Request) -> None:
        tokens = req.prompt.tokens
        limit = self.engine.loaded.context_length - len(tokens)
        max_tokens = max(1, min(req.params.max_tokens, limit))
        eos = [[t] for t in self.engine.loaded.eos_token_ids]
        (uid,) = self._generator().insert(
            [list(tokens[req.position :])],
            max_tokens=[max_tokens],
            caches=[req.prompt_cache],
            all_tokens=[list(tokens[: req.position])],
            samplers=[make_request_sampler(req.params)],
            stop_sequences=[StopSequences(eos)],
        )
        req.uid = uid
        self._by_uid[uid] = req

    def _decode_one_step(self) -> bool:
        if not self._by_uid:
            return False
        try:
            _, responses = self._generator().next()
        except BaseException as exc:  # a failed batch step fails its requests, not the worker
            log.exception("batch step failed")
            for req in list(self._by_uid.values()):
                self._fail(req, exc)
            self._gen = None
            return True
        for r in responses:
            owner = self._by_uid.get(r.uid)
            if owner is not None:
                self._on_token(owner, r.token, r.finish_reason, r.prompt_cache)
        return True

    def _on_token(self, req: _Request, token: int, finish: str | None, cache: Any) -> None:
        if not req.seen:
            req.first_token_at = time.perf_counter()
        req.seen.append(token)
        reason = finish
        if finish == "stop" and token in self.engine.loaded.eos_token_ids:
            pass  # the end-of-sequence token is not part of the answer
        else:
            req.generated.append(token)
            req.detok.add_token(token)
            if finish is not None:
                req.detok.finalize()
            text, hit = req.stopper.feed(req.detok.last_segment)
            if text:
                req.text.append(text)
                req.ticket._put(TextDelta(text, token))
            if hit:
                reason = "stop"
            elif reason is None and req.guard is not None and req.guard.feed(token):
                reason = "loop"
        if reason is None and req.ticket.cancelled:
            reason = "cancelled"
        if reason is not None:
            if cache is None:  # ended by us (stop string, cancel): take it out of the batch
                removed = self._generator().remove([req.uid], return_prompt_caches=True)
                cache = removed.get(req.uid, (None,))[0]
            self._finish(req, reason, cache)

    def _reap_cancelled(self) -> None:
        for req in list(self._active):
            if not req.ticket.cancelled:
                continue
            if req.uid is None:  # still prefilling: keep what was computed
                self._finish(req, "cancelled", req.prompt_cache, prefill_only=True)
            else:
                removed = self._generator().remove([req.uid], return_prompt_caches=True)
                self._finish(req, "cancelled", removed.get(req.uid, (None,))[0])

    def _finish(self, req: _Request, reason: str, cache: Any, prefill_only: bool = False) -> None:
        tail = req.stopper.flush() if reason != "stop" else ""
        if tail:
            req.text.append(tail)
            req.ticket._put(TextDelta(tail, req.generated[-1] if req.generated else -1))
        if req.session is not None:
            try:
                if prefill_only:
                    req.session.finish(list(req.prompt.tokens[: req.position]))
                elif cache is not None:
                    covered = (list(req.prompt.tokens) + req.seen)[: _cache_offset(cache)]
                    req.session.prompt_cache = cache
                    req.session.finish(covered)
                else:
                    req.session.abort()
            except Exception:  # storing is best effort: the answer is already complete
                log.exception("could not store request %s in the cache", req.ticket.id)
                req.session.abort()
        now = time.perf_counter()
        first = req.first_token_at or now
        stats = GenerationStats(
            prompt_tokens=len(req.prompt.tokens),
            cached_tokens=req.start,
            recomputed_tokens=len(req.prompt.tokens) - req.start,
            generated_tokens=len(req.generated),
            ttft_s=first - req.submitted,
            prefill_s=(req.prefill_done_at or now) - req.submitted,
            decode_s=now - first,
            peak_memory_bytes=int(mx.get_peak_memory()),
            finish_reason=reason,
        )
        lookup = getattr(req.session, "lookup", None)
        text, generated = "".join(req.text), list(req.generated)
        if reason == "loop" and req.guard is not None:  # keep the first copy, drop repeats
            generated = generated[: req.guard.keep_tokens]
            text = self.engine.loaded.tokenizer.decode(generated)
        req.ticket._put(Completion(text, generated, stats, lookup))
        req.ticket._put(_DONE)
        self._forget(req)
        self.completed += 1
        self.mean_request_s = 0.9 * self.mean_request_s + 0.1 * (now - req.submitted)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        if req.session is not None:
            req.session.abort()
        if not isinstance(exc, RagcacheError):
            log.exception("request %s failed", req.ticket.id, exc_info=exc)
        req.ticket._put(exc)
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        if req in self._active:
            self._active.remove(req)
        if req.uid is not None:
            self._by_uid.pop(req.uid, None)
        with self._lock:
            self._in_flight -= 1
