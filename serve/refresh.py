"""Keeping a running server's view of the store current while other processes write to it.

A thread polls the table for new commits (`ragcache.store_watch`) every `interval_s`; retrieval,
/ready and /v1/documents then read the new version, and the KV of every chunk the commit retired
(a document changed or deleted by `ragcache ingest --sync` in another process) is dropped on the
model worker's thread, which owns the cache.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ragcache.store_watch import StoreChange, StoreWatcher

log = logging.getLogger(__name__)


class StoreRefresher:
    def __init__(
        self,
        watcher: StoreWatcher,
        invalidate: Callable[[list[list[int]]], int],
        interval_s: float,
    ) -> None:
        self.watcher = watcher
        self.invalidate = invalidate
        self.interval_s = interval_s
        self.changes = 0  # commits seen from outside or inside
        self.kv_nodes_dropped = 0
        # Token spans of retired chunks whose KV is not dropped yet: the watcher has moved past
        # their commit, so a failed invalidation (worker busy or restarting) is retried from
        # here on the next poll instead of being forgotten.
        self.pending: list[list[int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return  # 0: never look again (a store no other process writes)
        self._thread = threading.Thread(
            target=self._run, name="ragcache-store-refresh", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def poll_once(self) -> StoreChange | None:
        """Look for a new commit and drop the KV it retired (and any a failed poll left).

        Raises what `invalidate` raises; the spans stay pending for the next poll."""
        change = self.watcher.poll()
        if change is not None:
            self.changes += 1
            self.pending.extend(change.removed_chunks.values())
        dropped = 0
        if self.pending:
            dropped = self.invalidate(list(self.pending))
            self.pending = []
            self.kv_nodes_dropped += dropped
        if change is None:
            return None
        log.info(
            "store moved from version %d to %d: %d chunks added, %d retired (%d KV nodes dropped)",
            change.old_version,
            change.new_version,
            change.added_chunks,
            len(change.removed_chunks),
            dropped,
        )
        return change

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # a store hiccup must not end the refresher; the next poll retries
                log.exception("could not check the store for new commits")
