"""What every client of generation relies on: the model worker's interface.

`ModelWorker` (one model on this process's thread) and the HTTP front's `ReplicaPool` (Ray Serve
replicas, serve.replicas) both have it, so handlers, batch runners and health checks work with
either unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from ragcache.runtime.ticket import Ticket
from ragcache.runtime.worker import WorkerSettings
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

T = TypeVar("T")


class GenerationWorker(Protocol):
    settings: WorkerSettings
    mean_request_s: float  # for Retry-After
    crashes: int
    last_crash: str | None

    @property
    def in_flight(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def active(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    def submit(
        self,
        prompt: SegmentedPrompt,
        params: SamplingParams | None = None,
        conversation: str | None = None,
    ) -> Ticket: ...

    def call(self, fn: Callable[[], T], timeout: float | None = 60.0) -> T: ...

    def stop(self, timeout: float = 30.0) -> None: ...


__all__ = ["GenerationWorker"]
