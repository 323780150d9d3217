"""The generation engine: one loaded model, its prefix cache, and its model worker.

The engine holds what runs the model: prefill in steps from the cached prefix, pausing at the
cache's capture positions to snapshot state there. Generating (`stream`, `generate`) goes through
the engine's one model worker (`ragcache.runtime`), the single execution path of every request:
the engine's model code runs on that worker's thread only.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import mlx.core as mx

from ragcache.errors import PromptTooLongError
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.settings import GenerationSettings

if TYPE_CHECKING:
    from ragcache.cache.chunk_kv import CopiedKV
    from ragcache.runtime import ModelWorker


class CacheSessionLike(Protocol):
    prompt_cache: list[Any]
    start: int
    capture_positions: list[int]
    lookup: Any

    def capture(self, position: int) -> None: ...
    def finish(self, all_tokens: Sequence[int]) -> None: ...
    def abort(self) -> None: ...


class PrefixCacheLike(Protocol):
    def begin(self, tokens: Sequence[int], boundaries: Sequence[int]) -> CacheSessionLike: ...
    def assemble(self, session: Any, chunk_spans: Sequence[tuple[int, int]]) -> list[CopiedKV]: ...


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    generated_tokens: int
    ttft_s: float  # request start to first token out, prefill included
    prefill_s: float
    decode_s: float
    peak_memory_bytes: int
    finish_reason: str  # "stop" (eos or stop string), "length", "loop", "cancelled"
    drafted_tokens: int = 0  # speculation: draft tokens checked by the model
    accepted_tokens: int = 0  # of those, the ones it agreed with (each saved a decode step)
    decode_steps: int = 0  # speculation: verify passes, each 1 + its draft's tokens (0: none)
    chunk_reused_tokens: int = 0  # chunk reuse: prompt tokens whose K/V was copied, not computed

    @property
    def prefill_tps(self) -> float:
        return self.recomputed_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; decode rate counts the ones after it.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "prefill_tps": round(self.prefill_tps, 1),
            "decode_tps": round(self.decode_tps, 2),
            "peak_memory_bytes": self.peak_memory_bytes,
            "finish_reason": self.finish_reason,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
        }


@dataclass(frozen=True)
class TextDelta:
    text: str
    token: int


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]
    stats: GenerationStats
    lookup: Any = None  # the cache's LookupStats when a cache is attached


class Engine:
    """Generate from a segmented prompt with an optional prefix cache."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: GenerationSettings | None = None,
        cache: PrefixCacheLike | None = None,
    ) -> None:
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.cache = cache
        self._worker: ModelWorker | None = None
        # Reentrant: the worker made under it attaches itself (attach_worker) while it is held.
        self._worker_lock = threading.RLock()

    def check_fits(self, n_prompt: int) -> None:
        limit = self.loaded.context_length
        if n_prompt >= limit:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens but {self.loaded.name} holds {limit} "
                f"({n_prompt - limit + 1} too many)",
                hint="shorten the prompt, retrieve fewer chunks, or use a model with a longer context",
            )

    # -- the runtime --------------------------------------------------------------------------
    def attach_worker(self, worker: ModelWorker) -> None:
        """Make `worker` the one that runs this engine (called by ModelWorker itself). An idle
        previous worker is stopped: two threads must never run one model and cache."""
        with self._worker_lock:
            old = self._worker
            if old is not None and old is not worker and old.running:
                if old.in_flight:
                    raise RuntimeError("this engine's worker is busy; stop it first")
                old.stop()
            self._worker = worker

    def worker(self) -> ModelWorker:
        """The model worker that runs this engine's generations, started on first use."""
        with self._worker_lock:  # two first callers must not start two workers
            worker = self._worker
            if worker is None or not worker.running:
                from ragcache.runtime import ModelWorker

                worker = ModelWorker(self).start()
            return worker

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker (in-flight requests finish first) and flush the cache's disk tier."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(timeout_s)

    def generate(
        self,
        prompt: SegmentedPrompt,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Run `stream` to the end and return its Completion."""
        for event in self.stream(prompt, params, cancel):
            if isinstance(event, Completion):
                return event
        raise AssertionError("stream ended without a Completion")

    def stream(
        self,
        prompt: SegmentedPrompt,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[TextDelta | Completion]:
        """Yield TextDelta events as text is decoded, then one Completion.

        Runs on this engine's model worker, like every generation (a client of one is a batch of
        one). Raises PromptTooLongError before any work if the prompt does not fit the context.
        Setting `cancel` stops at the next prefill step or token (finish_reason "cancelled");
        whatever was computed still goes into the cache.
        """
        yield from self.worker().submit(prompt, params).follow(cancel)

    def prefill_steps(
        self,
        tokens: Sequence[int],
        start: int,
        prompt_cache: list[Any],
        session: CacheSessionLike | None,
        copies: Sequence[CopiedKV] = (),
    ) -> Iterator[int]:
        """Feed the prompt in bounded steps, pausing at capture positions; yield each position.

        Yields `start` first, then the position after each step. Stops before the final piece:
        at most one step long and past every capture position, it is left for the caller to
        compute with logits (`_last_logits`, or the batch generator). A caller may stop
        iterating between steps (cancellation, or to interleave other work). `copies` (chunk
        reuse): runs of positions whose K/V is appended from chunk entries instead of computed.
        """
        n = len(tokens)
        copy_at = {c.start: c for c in copies}
        stops = sorted(
            {p for p in (session.capture_positions if session else []) if start < p < n}
            | {p for p in copy_at if start < p < n}
        )
        position = start
        step = max(1, self.settings.prefill_step_size)
        yield position
        while True:
            stops = [p for p in stops if p > position]
            if position in copy_at:
                copied = copy_at.pop(position)
                copied.append_to(prompt_cache)
                mx.eval([c.state for c in prompt_cache])
                position = copied.end
                yield position
                continue
            target = min(position + step, n)
            if stops and stops[0] <= target:
                target = stops.pop(0)
            if target == n:
                return
            self._forward(mx.array(list(tokens[position:target]))[None], cache=prompt_cache)
            mx.eval([c.state for c in prompt_cache])
            position = target
            if session and position in session.capture_positions:
                session.capture(position)
            mx.clear_cache()
            yield position

    def _forward(self, x: mx.array, cache: list[Any]) -> None:
        """Run the model over prefill tokens for their KV only.

        The output layer is skipped where the model exposes its inner transformer: nobody reads
        prefill logits, and Gemma 3's 262k-word output layer is most of its prefill FLOPs.
        """
        inner = _inner_transformer(self.loaded.model)
        if inner is not None:
            inner(x, cache=cache)
        else:
            self.loaded.model(x, cache=cache)


def _inner_transformer(model: Any) -> Any:
    """mlx-lm models wrap a `model` that maps tokens to hidden states and takes `cache`."""
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    try:
        params = inspect.signature(inner.__call__).parameters
    except (TypeError, ValueError):
        return None
    return inner if "cache" in params else None
