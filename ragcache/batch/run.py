"""Build a batch job from options, the way the CLI runs it: model, cache, worker, mode.

The HTTP layer already holds a stack and a worker; it builds `BatchJob` itself from the same
parts (`RagMode` or `LongContextMode`, `WorkerRunner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ragcache.batch.job import BatchJob, BatchSettings, BatchStatus, preflight
from ragcache.batch.longdoc import LongContextMode, LongContextSettings, read_documents
from ragcache.batch.modes import Mode, RagMode
from ragcache.batch.runners import Runner, SequentialRunner, WorkerRunner
from ragcache.cache import CacheSettings
from ragcache.settings import Settings
from ragcache.store_location import StoreLocation


@dataclass(frozen=True)
class BatchOptions:
    questions: Path
    answers: Path
    docs: tuple[Path, ...] = ()  # given: long-context mode; empty: RAG over the store
    db_dir: StoreLocation | None = None  # a folder or an object-store URI
    table: str = "chunks"
    model: str | None = None
    k: int | None = None
    order: str | None = None  # chunk order in RAG prompts (ragcache.order.ORDERS)
    where: str | None = None
    cache: bool = True
    cache_dir_off: bool = False  # keep the KV cache in RAM only (no disk tier)
    cache_settings: CacheSettings = field(default_factory=CacheSettings)
    worker: bool = True  # batched decode on a ModelWorker; False: one request at a time
    max_batch: int = 8
    batch: BatchSettings = field(default_factory=BatchSettings)
    long_context: LongContextSettings = field(default_factory=LongContextSettings)


@dataclass
class BatchParts:
    """What a job runs on; `close()` stops the worker and flushes the cache's disk tier."""

    job: BatchJob
    mode: Mode
    worker: object | None
    stack: object | None
    cache: object | None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()  # type: ignore[attr-defined]  # also flushes the cache
        elif self.cache is not None:
            self.cache.flush()  # type: ignore[attr-defined]


def build_batch(settings: Settings, options: BatchOptions) -> BatchParts:
    """Check the paths, load the model (and the store in RAG mode), start a worker; build the job.

    Raises EmptyBatchError / OutputNotWritableError before loading anything, then the errors of
    the model, the store, and PromptTooLongError when the documents leave no room for a question.
    """
    from ragcache.engine import Engine
    from ragcache.model_loader import load_model
    from ragcache.stack import StackOptions, build_cache, build_stack

    preflight(options.questions, options.answers)
    stack_options = StackOptions(
        db_dir=options.db_dir,
        table=options.table,
        model=options.model,
        cache=options.cache,
        cache_dir_off=options.cache_dir_off,
        cache_settings=options.cache_settings,
    )
    stack = None
    mode: Mode
    if options.docs:
        documents = read_documents(options.docs)
        loaded = load_model(
            options.model or settings.model.name, settings.home, settings.model.quant
        )
        mode = LongContextMode(loaded, documents, options.long_context)
        cache = build_cache(loaded, settings, stack_options)
        engine = Engine(loaded, settings.generation, cache)
    else:
        stack = build_stack(settings, stack_options)
        cache, engine = stack.cache, stack.engine
        mode = RagMode(stack.answerer, options.k, options.order, options.where)
    worker = None
    runner: Runner
    if options.worker:
        from ragcache.runtime import ModelWorker, WorkerSettings

        worker = ModelWorker(engine, WorkerSettings(max_batch=options.max_batch))
        worker.start()
        runner = WorkerRunner(worker, options.max_batch)
    else:
        runner = SequentialRunner(engine)
    job = BatchJob(options.questions, options.answers, mode, runner, options.batch)
    return BatchParts(job, mode, worker, stack, cache)


def run_batch(settings: Settings, options: BatchOptions) -> BatchStatus:
    """Run a batch to the end in this thread (Ctrl-C cancels cleanly); return its status."""
    parts = build_batch(settings, options)
    try:
        try:
            return parts.job.run()
        except KeyboardInterrupt:
            parts.job.cancel()
            raise
    finally:
        parts.close()
