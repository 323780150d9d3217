"""Threads for MLX work that never exit; a finished loop parks its thread for the next one.

MLX keeps a thread-local compile cache whose destructor takes the GIL when the OS thread exits. A
thread that exits while the interpreter finalizes aborts the whole process ("terminate called
without an active exception"), and `Thread.join` returns before those destructors run. A parked
thread never exits, so its destructors never run.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class LongLivedThreads:
    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[queue.SimpleQueue] = queue.SimpleQueue()

    def submit(self, fn: Callable[[], None], name: str) -> threading.Event:
        """Run `fn` on a parked thread (or a new one); the event is set when it returns."""
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


THREADS = LongLivedThreads()
