"""The handle a client holds on one submitted generation: its events, and a way to cancel it."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio

from ragcache.engine import Completion, TextDelta

Event = TextDelta | Completion
log = logging.getLogger(__name__)
DONE = object()  # after the Completion (or the error): the stream is over


class Ticket:
    """Handle of one submitted request. Thread-safe."""

    def __init__(self, ticket_id: int, worker_thread: int | None = None) -> None:
        self.id = ticket_id
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancel = threading.Event()
        self._worker_thread = worker_thread
        self._done_callbacks: list[Callable[[], None]] = []
        self._cancel_callbacks: list[Callable[[], None]] = []
        self._ended = False
        self.replica: str | None = None  # the replica that ran it, when a pool routed it
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the generation at its next step; what it computed still goes into the cache."""
        with self._lock:
            first = not self._cancel.is_set()
            self._cancel.set()
            callbacks = list(self._cancel_callbacks) if first else []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # the far side is gone already: nothing left to cancel there
                log.warning("a cancel callback failed", exc_info=True)

    def add_cancel_callback(self, fn: Callable[[], None]) -> None:
        """Call `fn` (once) when the ticket is cancelled, at once if it already is: how a
        generation running elsewhere (a replica) hears of it without polling."""
        with self._lock:
            if not self._cancel.is_set():
                self._cancel_callbacks.append(fn)
                return
        fn()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def put(self, item: Any) -> None:
        """Called by the worker: a TextDelta, the Completion, an exception, then DONE."""
        self._events.put(item)
        if item is DONE:
            with self._lock:
                self._ended, callbacks = True, list(self._done_callbacks)
            for fn in callbacks:
                fn()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the request has ended (at once if it already has), whether or not
        anyone reads its events: a client gone before its stream started still frees what the
        request held."""
        with self._lock:
            if not self._ended:
                self._done_callbacks.append(fn)
                return
        fn()

    def _next(self, timeout: float | None) -> Any:
        if threading.get_ident() == self._worker_thread:
            raise RuntimeError("waiting for a generation on the worker's own thread deadlocks")
        item = self._events.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """TextDelta events as text is decoded, then one Completion. Re-raises request errors;
        raises queue.Empty when no event came for `timeout` seconds."""
        while True:
            item = self._next(timeout)
            if item is DONE:
                return
            yield item

    def follow(
        self, cancel: threading.Event | None = None, poll_s: float = 0.05
    ) -> Iterator[Event]:
        """`events()` for a synchronous caller: setting `cancel` cancels the request (it still
        ends with its Completion, finish_reason "cancelled"), and so does leaving early."""
        finished = False
        if cancel is not None and cancel.is_set():
            self.cancel()
        try:
            while True:
                try:
                    item = self._next(poll_s if cancel is not None else None)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        self.cancel()
                    continue
                if item is DONE:
                    finished = True
                    return
                if cancel is not None and cancel.is_set():
                    self.cancel()
                yield item
        finally:
            if not finished:
                self.cancel()

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
                if item is DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                self.cancel()
