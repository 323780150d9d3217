"""The runtime: the one execution path of every generation (CLI, batch jobs, HTTP).

- `worker.ModelWorker`: the thread that owns the model and its cache; clients submit to it.
- `sequence.Sequence`: one request's state machine (prefill, cache capture, decode, stop
  strings, statistics, storing its KV).
- `ticket.Ticket`: what a client holds: the request's events, and cancel.
- `protocol.GenerationWorker`: the worker's interface, which serve.replicas' pool also has.
"""

from ragcache.runtime.protocol import GenerationWorker
from ragcache.runtime.ticket import Ticket
from ragcache.runtime.worker import (
    ModelWorker,
    QueueFullError,
    WorkerCrashedError,
    WorkerSettings,
    WorkerStoppedError,
)

__all__ = [
    "GenerationWorker",
    "ModelWorker",
    "QueueFullError",
    "Ticket",
    "WorkerCrashedError",
    "WorkerSettings",
    "WorkerStoppedError",
]
