"""The model worker: the one thread that runs a model, for every client (CLI, batch jobs, HTTP).

Requests reach it through a bounded queue. Each becomes a `Sequence` that restores its own prefix
from the cache and prefills the rest in steps, interleaved with the others' decoding (so a long
prompt never stalls running streams); its final prompt piece then joins mlx-lm's
`BatchGenerator`, which decodes every running sequence as one batch (a batch of one when a
single client asks). When a sequence ends, its KV goes back into the cache.

The loop is supervised: an exception anywhere in a step fails every request in flight or queued
with a retriable `WorkerCrashedError` (none is left waiting), the cache is kept only if it is
consistent, and the loop starts again; `healthy` is False meanwhile, which /ready reports.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from ragcache import failpoints
from ragcache.engine import Engine
from ragcache.errors import RagcacheError
from ragcache.output_screen import greedy_steps
from ragcache.runtime.lookup import DraftRecord, LookupSettings
from ragcache.runtime.sequence import Sequence
from ragcache.runtime.speculate import (
    SpeculativeDecoder,
    cache_offset,
    can_cut_back,
    cut_back,
)
from ragcache.runtime.threads import THREADS
from ragcache.runtime.ticket import Ticket
from ragcache.sampling import SamplingParams, make_request_sampler
from ragcache.segments import SegmentedPrompt

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSettings:
    max_queue: int = 64  # requests waiting or running; beyond that submit() refuses
    max_batch: int = 8  # sequences decoded together
    idle_wait_s: float = 0.05
    # After a crash the worker restarts at once, then waits longer after each further crash within
    # `crash_window_s` (doubling up to `max_restart_delay_s`), so a bug hit by every request does
    # not spin the CPU while /ready reports the worker down.
    first_restart_delay_s: float = 0.05
    max_restart_delay_s: float = 5.0
    crash_window_s: float = 60.0
    # A greedy request decoding alone drafts from its prompt and verifies the draft in one pass
    # (runtime.speculate): same tokens, fewer steps. With company it joins the batch, which
    # decodes one token per sequence per step (benchmarks/speculative.py measures both).
    lookup: LookupSettings = field(default_factory=LookupSettings)


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


class WorkerCrashedError(WorkerStoppedError):
    """The model worker crashed while this request was queued or running; it has restarted (or
    is restarting), so the same request can simply be sent again."""

    def __init__(self, cause: BaseException, retry_after_s: float = 1.0) -> None:
        super().__init__(
            f"the model worker crashed ({type(cause).__name__}: {cause}) and is restarting; "
            "this request was not completed",
            hint=f"retry in {retry_after_s:.0f} s",
        )
        self.retry_after_s = retry_after_s


# Workers whose loop is running. A loop still running when the interpreter exits aborts the
# process (MLX's per-thread state is torn down under it: "terminate called without an active
# exception"), so every one is stopped at exit, which also flushes its cache's disk tier.
_RUNNING: weakref.WeakSet[ModelWorker] = weakref.WeakSet()


@atexit.register
def _stop_running_workers() -> None:
    for worker in list(_RUNNING):
        worker.stop(timeout=5.0)


class ModelWorker:
    """Runs every generation of one engine on one thread, decoding concurrent requests together.

    An engine has at most one worker: making a new one retires the engine's idle previous one
    (`Engine.stream` starts a default worker on first use).
    """

    def __init__(self, engine: Engine, settings: WorkerSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or WorkerSettings()
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._active: list[Sequence] = []
        self._running: threading.Event | None = None  # set when the loop has ended
        self._thread_id: int | None = None
        self._stopping = threading.Event()
        self._gen: BatchGenerator | None = None
        self._by_uid: dict[int, Sequence] = {}
        self._solo: Sequence | None = None  # decoding alone, speculatively
        lookup = self.settings.lookup.validate()
        # Whether drafting paid on the sequences that finished: new ones start from it.
        self.drafts = DraftRecord.from_settings(lookup)
        self.completed = 0
        self.mean_request_s = 5.0  # for Retry-After; updated as requests finish
        self.crashes = 0  # times the loop crashed and was restarted
        self.last_crash: str | None = None
        self._recent_crashes: list[float] = []
        self._healthy = threading.Event()  # clear while recovering from a crash
        self._healthy.set()
        engine.attach_worker(self)

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

    @property
    def running(self) -> bool:
        return self._running is not None and not self._stopping.is_set()

    @property
    def healthy(self) -> bool:
        """Running and not recovering from a crash: what /ready reports."""
        return self.running and self._healthy.is_set()

    def start(self) -> ModelWorker:
        if self._running is None:
            self._stopping.clear()
            self._running = THREADS.submit(self._run, "ragcache-model-worker")
            _RUNNING.add(self)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (cancel them after `timeout`), then
        flush the cache's disk tier. Idempotent."""
        if self._running is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        for seq in list(self._active):
            seq.ticket.cancel()
        if not self._running.wait(timeout=max(1.0, deadline - time.monotonic() + 5)):
            # Still running (a step stuck in the model): leave its state to its own thread.
            log.warning("the model worker did not stop within %.0f s", timeout)
            return
        self._running = None
        _RUNNING.discard(self)
        self._gen = None
        cache = self.engine.cache
        if cache is not None and hasattr(cache, "flush"):
            cache.flush()

    def submit(
        self,
        prompt: SegmentedPrompt,
        params: SamplingParams | None = None,
        conversation: str | None = None,
    ) -> Ticket:
        """Queue a generation. Raises QueueFullError, WorkerStoppedError, PromptTooLongError,
        InvalidRequestError (bad sampling values) before queueing anything.

        `conversation` is a routing hint for a pool of replicas (serve.replicas keeps a
        conversation on one replica); a single worker has nothing to route and ignores it."""
        params = (params or SamplingParams()).validate()
        self.engine.check_fits(len(prompt.tokens))
        if self._stopping.is_set() or self._running is None:
            raise WorkerStoppedError("the model worker is not running", hint="retry shortly")
        if not self._healthy.is_set():
            raise WorkerStoppedError(
                "the model worker is restarting after a crash", hint="retry in 1 s"
            )
        with self._lock:
            if self._in_flight >= self.settings.max_queue:
                per_slot = self.mean_request_s / max(1, self.settings.max_batch)
                raise QueueFullError(self._in_flight, max(1.0, per_slot * self._in_flight))
            self._in_flight += 1
        ticket = Ticket(next(self._ids), self._thread_id)
        self._inbox.put(Sequence(ticket, prompt, params, time.perf_counter()))
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
        """The supervised loop: a crash anywhere in a step fails the requests it had, restores
        a consistent state and starts the loop again."""
        self._thread_id = threading.get_ident()
        while True:
            try:
                self._loop()
                return
            except BaseException as exc:
                self._recover(exc)

    def _loop(self) -> None:
        while True:
            self._run_calls()
            self._admit()
            self._reap_cancelled()  # before any step: a request cancelled in time costs nothing
            busy = self._prefill_one_step()
            busy = self._decode_one_step() or busy
            if self._stopping.is_set() and not self._active and self._inbox.empty():
                self._run_calls()
                return
            if not busy:
                self._wait_for_work()

    def _recover(self, exc: BaseException) -> None:
        """Fail every request in flight or queued (their state may be half-updated), drop the
        batch generator, keep the KV cache only if it is consistent, then wait a little."""
        self._healthy.clear()
        self.crashes += 1
        self.last_crash = f"{type(exc).__name__}: {exc}"
        log.error("model worker crashed; restarting", exc_info=exc)
        error = WorkerCrashedError(exc)
        doomed = list(self._active)
        while True:
            try:
                doomed.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for seq in doomed:
            self._fail(seq, error)
        self._active.clear()
        self._by_uid.clear()
        self._solo = None
        self._gen = None
        recover = getattr(self.engine.cache, "recover", None)
        if recover is not None:
            try:
                recover()
            except Exception:
                log.exception("could not check the KV cache after the crash")
        now = time.monotonic()
        window = self.settings.crash_window_s
        self._recent_crashes = [t for t in self._recent_crashes if now - t < window] + [now]
        delay = self.settings.first_restart_delay_s * 2 ** (len(self._recent_crashes) - 1)
        time.sleep(min(self.settings.max_restart_delay_s, delay))
        self._healthy.set()

    def _wait_for_work(self) -> None:
        try:
            seq = self._inbox.get(timeout=self.settings.idle_wait_s)
        except queue.Empty:
            return
        self._start(seq)

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
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._start(seq)

    def _start(self, seq: Sequence) -> None:
        if not self._active:  # alone: the peak it reports is its own
            mx.reset_peak_memory()
        try:
            seq.begin(self.engine)
            self._active.append(seq)
        except BaseException as exc:
            self._fail(seq, exc)

    def _prefill_one_step(self) -> bool:
        """Do one prefill step (the oldest sequence still prefilling) between decode steps.

        Sequences whose prefill is done join the batch in the same pass, so requests that arrive
        together start decoding together.
        """
        busy = False
        for seq in list(self._active):
            if not seq.prefilling:
                continue
            try:
                stepped = seq.prefill_step()
            except BaseException as exc:
                self._fail(seq, exc)
                busy = True
                continue
            if stepped:
                return True
            self._join_batch(seq)
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

    def _join_batch(self, seq: Sequence) -> None:
        failpoints.hit("worker.join_batch")
        if self._solo is not None:  # company: the speculating sequence joins the batch too
            self._merge_solo()
        elif not self._by_uid and self._alone(seq) and self._speculates(seq):
            try:
                self._go_solo(seq)
            except Exception as exc:  # this request fails, not the worker
                self._fail(seq, exc)
            return
        rest, done, max_tokens = seq.decode_inputs()
        self._insert(seq, rest, done, max_tokens)

    def _insert(self, seq: Sequence, rest: list[int], done: list[int], max_tokens: int) -> None:
        eos = [[t] for t in self.engine.loaded.eos_token_ids]
        (uid,) = self._generator().insert(
            [rest],
            max_tokens=[max_tokens],
            caches=[seq.prompt_cache if seq.spec is None else seq.spec.kv],
            all_tokens=[done],
            samplers=[make_request_sampler(seq.params)],
            stop_sequences=[StopSequences(eos)],
        )
        seq.uid = uid
        self._by_uid[uid] = seq

    # -- speculative decoding of a sequence alone ----------------------------------------------
    def _alone(self, seq: Sequence) -> bool:
        """Nothing else is prefilling or queued. Requests that arrive together would otherwise
        start with the first one speculating for a few steps and then pay for merging it into
        the batch (8 at once measured 0.88x the speed without speculation); they decode as one
        batch from the start instead, as with speculation off."""
        alone_can_batch = self.settings.max_batch > 1  # with one slot nothing ever joins it
        return self._active == [seq] and (self._inbox.empty() or not alone_can_batch)

    def _speculates(self, seq: Sequence) -> bool:
        # A cache that cannot be cut back (recurrent state) never takes a draft: such a
        # sequence decodes in the batch, whose steps overlap the next step's graph building with
        # this one's compute (a solo step that drafts nothing measured ~7-10% slower on Gemma 3,
        # benchmarks/speculative.py).
        return (
            seq.params.speculation == "lookup"
            and seq.params.temperature == 0
            and can_cut_back(seq.prompt_cache)
            and (seq.spec.drafting if seq.spec is not None else self._may_start_drafting(seq))
        )

    def _may_start_drafting(self, seq: Sequence) -> bool:
        """Asked once per sequence, when it could first go solo: whether drafting paid on
        this model's recent sequences (`DraftRecord`); one in `probe_every` drafts regardless."""
        if seq.may_draft is None:
            seq.may_draft = self.drafts.start_drafting()
        return seq.may_draft

    def _go_solo(self, seq: Sequence) -> None:
        rest, _, _ = seq.decode_inputs()
        self._speculate_alone(seq, seq.prompt_cache, rest)

    def _speculate_alone(self, seq: Sequence, kv: list[Any], rest: list[int]) -> None:
        """Decode `seq` alone from here on with drafts: `kv` holds its prompt and answer so far
        but for `rest`, which is fed first. Draft counts and step timings of an earlier solo
        stretch carry over."""
        seq.spec = SpeculativeDecoder(
            self.engine.loaded.model,
            kv,
            [*seq.prompt.tokens, *seq.seen],
            self.settings.lookup,
            seq.spec.stats if seq.spec is not None else None,
            seq.spec.payoff if seq.spec is not None else None,
        )
        self._solo = seq
        with greedy_steps():  # speculation is greedy only
            first = seq.spec.first(rest)
        self._solo_tokens(seq, [first])

    def _solo_step(self) -> None:
        seq = self._solo
        assert seq is not None and seq.spec is not None
        if not seq.spec.drafting:  # drafting measured slower here: the batch's steps pipeline
            self._merge_solo()
            return
        left = seq.max_tokens - len(seq.seen)
        with greedy_steps():  # speculation is greedy only
            tokens = seq.spec.step(left)
        self._solo_tokens(seq, tokens)

    def _solo_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        """Hand decoded tokens to the sequence one by one, as the batch would; stop at the
        first that ends it (the cache is cut back to it: nothing after a stop is kept)."""
        eos = self.engine.loaded.eos_token_ids
        for token in tokens:
            finish = "stop" if token in eos else None
            if finish is None and len(seq.seen) + 1 >= seq.max_tokens:
                finish = "length"
            reason = seq.on_token(token, finish, eos)
            if reason is not None:
                assert seq.spec is not None
                seq.spec.cut_to(len(seq.prompt.tokens) + len(seq.seen))
                self._finish(seq, reason, seq.spec.kv)
                return

    def _merge_solo(self) -> None:
        """Move the speculating sequence into the batch: its pending token becomes the batch's
        prompt for it, its cache the batch's cache."""
        seq = self._solo
        assert seq is not None and seq.spec is not None
        self._solo = None
        pending = seq.spec.pending
        assert pending is not None
        fed = list(seq.prompt.tokens) + seq.seen[:-1]
        seq.spec.cut_to(len(fed))
        assert cache_offset(seq.spec.kv) == len(fed)
        self._insert(seq, [pending], fed, seq.max_tokens - len(seq.seen))

    def _decode_one_step(self) -> bool:
        if self._solo is not None:
            failpoints.hit("worker.solo_step")
            seq = self._solo  # a step that moves it into the batch clears _solo first
            try:
                self._solo_step()
            except Exception as exc:  # a failed step fails its request, not the worker
                log.exception("speculative step failed")
                self._fail(seq, exc)
            return True
        if not self._by_uid:
            return False
        # The step's logits only pick tokens; greedily for every sequence: screenable.
        greedy = all(seq.params.temperature == 0 for seq in self._by_uid.values())
        try:
            with greedy_steps(greedy):
                _, responses = self._generator().next()
        except BaseException as exc:  # a failed batch step fails its requests, not the worker
            log.exception("batch step failed")
            for seq in list(self._by_uid.values()):
                self._fail(seq, exc)
            self._gen = None
            return True
        for r in responses:
            owner = self._by_uid.get(r.uid)
            if owner is not None:
                self._on_token(owner, r.token, r.finish_reason, r.prompt_cache)
        self._leave_batch_when_alone()
        return True

    def _leave_batch_when_alone(self) -> None:
        """The last sequence of a batch whose others finished, with no one waiting, decodes the
        rest of its answer alone, speculatively: a request that arrived while another was
        answering gets the speed of drafts once it has the model to itself. Leaving costs a copy
        of its KV out of the batch and one forward pass (below); a newcomer moves it back in."""
        if self._solo is not None or len(self._by_uid) != 1:
            return
        ((uid, seq),) = self._by_uid.items()
        if seq.prefilling or not seq.seen or not self._alone(seq) or not self._speculates(seq):
            return
        try:
            kv = self._remove_from_batch(seq)
            del self._by_uid[uid]
            seq.uid = None
            # The batch has fed every token it returned, and computed the next one without
            # returning it: the last token is cut back off and fed again alone, so the next
            # token comes from the solo path (the same token: batched and solo greedy agree).
            fed = len(seq.prompt.tokens) + len(seq.seen) - 1
            extra = cache_offset(kv) - fed
            if extra != 1:
                raise RuntimeError(f"the batch's cache holds {extra} tokens past {fed}, not 1")
            cut_back(kv, extra)
            self._speculate_alone(seq, kv, seq.seen[-1:])
        except Exception as exc:  # this request fails, not the worker
            self._by_uid.pop(uid, None)
            seq.uid = None
            self._fail(seq, exc)

    def _on_token(self, seq: Sequence, token: int, finish: str | None, kv: Any) -> None:
        failpoints.hit("worker.on_token")
        reason = seq.on_token(token, finish, self.engine.loaded.eos_token_ids)
        if reason is None:
            return
        if kv is None:  # ended by us (stop string, loop, cancel): take it out of the batch
            kv = self._remove_from_batch(seq)
        self._finish(seq, reason, kv)

    def _remove_from_batch(self, seq: Sequence) -> Any:
        removed = self._generator().remove([seq.uid], return_prompt_caches=True)
        return removed.get(seq.uid, (None,))[0]

    def _reap_cancelled(self) -> None:
        for seq in list(self._active):
            if not seq.ticket.cancelled:
                continue
            if seq is self._solo:
                assert seq.spec is not None
                seq.spec.cut_to(len(seq.prompt.tokens) + len(seq.seen))
                self._finish(seq, "cancelled", seq.spec.kv)
            elif seq.uid is None:  # still prefilling: keep what was computed
                self._finish(seq, "cancelled", seq.prompt_cache, prefill_only=True)
            else:
                self._finish(seq, "cancelled", self._remove_from_batch(seq))

    def _finish(self, seq: Sequence, reason: str, kv: Any, prefill_only: bool = False) -> None:
        failpoints.hit("worker.finish")
        if seq.spec is not None:  # its drafted and plain steps' timings, for the next ones
            self.drafts.add(seq.spec.payoff)
        seq.finish(reason, kv, self.engine.loaded.tokenizer, prefill_only)
        self._forget(seq)
        self.completed += 1
        elapsed = time.perf_counter() - seq.submitted
        self.mean_request_s = 0.9 * self.mean_request_s + 0.1 * elapsed

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if not isinstance(exc, RagcacheError):
            log.exception("request %s failed", seq.ticket.id, exc_info=exc)
        seq.fail(exc)
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        if seq.counted_out:  # failed after finishing had begun: count it out once
            return
        seq.counted_out = True
        if seq is self._solo:
            self._solo = None
        if seq in self._active:
            self._active.remove(seq)
        if seq.uid is not None:
            self._by_uid.pop(seq.uid, None)
        with self._lock:
            self._in_flight -= 1
