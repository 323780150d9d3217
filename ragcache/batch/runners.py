"""Run prepared requests in schedule order: one at a time on an Engine, or batched on a worker.

Both call `on_done` once per request they start, from whichever thread finished it, and stop
starting requests once `cancel` is set. The worker runner keeps up to `max_in_flight` requests
submitted, in schedule order, so neighbours that share a prefix decode together while the cache
holds it; a request whose leader is still prefilling their shared prefix waits for it, so the
group restores that prefix instead of every member computing it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ragcache.batch.modes import Prepared
from ragcache.engine import Completion, Engine
from ragcache.errors import RagcacheError

log = logging.getLogger(__name__)
_POLL_S = 0.05


@dataclass(frozen=True)
class Finished:
    item: Prepared
    started: float  # perf_counter when the request was handed to the engine or worker
    completion: Completion | None = None
    error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.completion is not None and self.completion.stats.finish_reason == "cancelled"


OnDone = Callable[[Finished], None]
Refresh = Callable[[Prepared], Prepared]


def _refreshed(item: Prepared, refresh: Refresh | None) -> Prepared:
    if refresh is None:
        return item
    try:
        return refresh(item)
    except Exception:  # keep the prompt built at prepare time: it is still a valid prompt
        log.warning("batch: could not refresh request %s", item.request.id, exc_info=True)
        return item


class Runner(Protocol):
    def run(
        self,
        items: Sequence[Prepared],
        wait_for: Sequence[int | None],
        on_done: OnDone,
        cancel: threading.Event,
        refresh: Refresh | None = None,
    ) -> None:
        """Run `items` in order; `wait_for[i]` is the position of an earlier item whose prefill
        item i should wait for (None: no wait); `refresh` rebuilds an item right before it runs.
        Returns when every started item is done."""
        ...


class SequentialRunner:
    """One request at a time in the calling thread (no worker; also the baseline)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(
        self,
        items: Sequence[Prepared],
        wait_for: Sequence[int | None],
        on_done: OnDone,
        cancel: threading.Event,
        refresh: Refresh | None = None,
    ) -> None:
        for item in items:
            if cancel.is_set():
                return
            item = _refreshed(item, refresh)
            started = time.perf_counter()
            try:
                completion = self.engine.generate(item.prompt, item.params, cancel)
            except Exception as exc:  # one failed question must not stop the batch
                on_done(Finished(item, started, error=exc))
                continue
            on_done(Finished(item, started, completion))


class WorkerRunner:
    """Submits to a `ragcache.runtime.ModelWorker`, keeping up to `max_in_flight` requests in it."""

    def __init__(self, worker: Any, max_in_flight: int = 8) -> None:
        self.worker = worker
        self.max_in_flight = max(1, max_in_flight)

    def run(
        self,
        items: Sequence[Prepared],
        wait_for: Sequence[int | None],
        on_done: OnDone,
        cancel: threading.Event,
        refresh: Refresh | None = None,
    ) -> None:
        slots = threading.Semaphore(self.max_in_flight)
        prefilled = [threading.Event() for _ in items]
        ended = [threading.Event() for _ in items]
        live: set[Any] = set()
        lock = threading.Lock()
        threads: list[threading.Thread] = []

        def wait(event: threading.Event | threading.Semaphore) -> bool:
            # Poll so a cancel is seen while blocked; True once acquired or set.
            while not cancel.is_set():
                ok = (
                    event.acquire(timeout=_POLL_S)
                    if isinstance(event, threading.Semaphore)
                    else event.wait(_POLL_S)
                )
                if ok:
                    return True
            return False

        def consume(pos: int, item: Prepared, ticket: Any, started: float) -> None:
            completion, error = None, None
            try:
                for event in ticket.events():
                    prefilled[pos].set()  # the first event comes after prefill
                    if isinstance(event, Completion):
                        completion = event
            except Exception as exc:
                error = exc
            finally:
                prefilled[pos].set()
                ended[pos].set()
                with lock:
                    live.discard(ticket)
                slots.release()
            if error is None and completion is None:
                error = RagcacheError("the worker ended the request without a completion")
            on_done(Finished(item, started, completion, error))

        run_over = threading.Event()

        def cancel_live() -> None:
            while not cancel.wait(_POLL_S * 4):
                if run_over.is_set():
                    return
            with lock:
                for ticket in list(live):
                    ticket.cancel()

        watcher = threading.Thread(target=cancel_live, daemon=True)
        watcher.start()
        for pos, item in enumerate(items):
            if not wait(slots):
                break
            leader = wait_for[pos]
            if leader is not None and not self._wait_leader(item, leader, prefilled, ended, wait):
                slots.release()
                break
            item = _refreshed(item, refresh)
            started = time.perf_counter()
            try:
                ticket = self._submit(item, cancel)
            except Exception as exc:
                prefilled[pos].set()
                ended[pos].set()
                slots.release()
                on_done(Finished(item, started, error=exc))
                continue
            if ticket is None:  # cancelled while the queue was full
                slots.release()
                break
            with lock:
                live.add(ticket)
                if cancel.is_set():
                    ticket.cancel()
            thread = threading.Thread(
                target=consume, args=(pos, item, ticket, started), name=f"batch-{pos}", daemon=True
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        run_over.set()

    def _wait_leader(self, item, leader, prefilled, ended, wait) -> bool:
        """Wait until the cache holds the prefix `item` shares with its leader; False if cancelled.

        The leader's prefill ends at its first event; whether the shared prefix is in the tree by
        then depends on where the cache captures (segment boundaries for snapshot models, every
        N tokens for others), so ask the tree, and if it lacks the prefix wait for the leader's
        end, when its whole prompt is stored.
        """
        if not wait(prefilled[leader]):
            return False
        # A pool of replicas (serve.replicas) has no engine here: its caches are out of reach.
        cache = getattr(getattr(self.worker, "engine", None), "cache", None)
        if cache is None or ended[leader].is_set():
            return True
        need = item.prompt.tokens[: item.wait_tokens]
        held = self.worker.call(lambda: cache.tree.match(need).prefix_len)
        return held >= len(need) or wait(ended[leader])

    def _submit(self, item: Prepared, cancel: threading.Event) -> Any:
        from ragcache.runtime import QueueFullError

        while True:
            try:
                return self.worker.submit(item.prompt, item.params)
            except QueueFullError as exc:  # other clients share the worker: back off and retry
                if cancel.wait(max(_POLL_S, float(getattr(exc, "retry_after_s", 0.1)))):
                    return None
