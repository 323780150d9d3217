"""The generation engine: prefill in steps (resuming from the prefix cache), then stream tokens.

One engine owns one loaded model and, optionally, its prefix cache. It is not thread-safe: one
worker calls it at a time. The decode loop is mlx-lm's own `generate_step`, so decode speed is
mlx-lm's; what the engine adds is prefill that starts at the cached prefix and pauses at the
cache's capture positions to snapshot state there.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ragcache.errors import PromptTooLongError
from ragcache.loop_guard import LoopGuard
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams, StopMatcher
from ragcache.segments import SegmentedPrompt
from ragcache.settings import GenerationSettings


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


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    def since(self) -> float:
        return time.perf_counter() - self.start


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

    def check_fits(self, n_prompt: int) -> None:
        limit = self.loaded.context_length
        if n_prompt >= limit:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens but {self.loaded.name} holds {limit} "
                f"({n_prompt - limit + 1} too many)",
                hint="shorten the prompt, retrieve fewer chunks, or use a model with a longer context",
            )

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

        Raises PromptTooLongError before any work if the prompt does not fit the context.
        Setting `cancel` stops at the next prefill step or token (finish_reason "cancelled");
        whatever was computed still goes into the cache.
        """
        params = (params or SamplingParams()).validate()
        tokens = prompt.tokens
        self.check_fits(len(tokens))
        max_tokens = min(params.max_tokens, self.loaded.context_length - len(tokens))
        timer = _Timer()
        mx.reset_peak_memory()
        if params.seed is not None:
            mx.random.seed(params.seed)

        session = self.cache.begin(tokens, prompt.boundaries) if self.cache else None
        prompt_cache = session.prompt_cache if session else make_prompt_cache(self.loaded.model)
        start = session.start if session else 0
        try:
            position = self._prefill(tokens, start, prompt_cache, session, cancel)
            cancelled = cancel is not None and cancel.is_set()
            if not cancelled:
                # The last piece of the prompt gives the first token's logits.
                sampler = make_sampler(params.temperature, params.top_p)
                logits = self._last_logits(mx.array(tokens[position:])[None], prompt_cache)
                first = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                mx.eval(first)
        except BaseException:
            if session:
                session.abort()
            raise
        if cancelled:
            if session:
                session.finish(tokens[:position])
            stats = self._stats(tokens, start, [], timer, timer.since(), 0.0, "cancelled")
            yield Completion("", [], stats, session.lookup if session else None)
            return
        ttft_s = prefill_s = timer.since()

        generated: list[int] = []
        seen: list[int] = []  # every token fed back to the model, eos included
        text_parts: list[str] = []
        stopper = StopMatcher(params.stop)
        guard = LoopGuard() if params.stop_loops else None
        detok = self.loaded.tokenizer.detokenizer
        detok.reset()
        eos = self.loaded.eos_token_ids
        finish_reason = "length"

        def tokens_out() -> Iterator[int]:
            yield int(first.item())  # type: ignore[arg-type]
            if max_tokens > 1:
                steps = generate_step(
                    first.reshape(1),
                    self.loaded.model,
                    prompt_cache=prompt_cache,
                    sampler=sampler,
                    max_tokens=max_tokens - 1,
                )
                for token, _logprobs in steps:
                    yield int(token)

        try:
            for token in tokens_out():
                seen.append(token)
                if token in eos:
                    finish_reason = "stop"
                    break
                generated.append(token)
                detok.add_token(token)
                text, hit = stopper.feed(detok.last_segment)
                if text:
                    text_parts.append(text)
                    yield TextDelta(text, token)
                if hit:
                    finish_reason = "stop"
                    break
                if guard is not None and guard.feed(token):
                    finish_reason = "loop"
                    break
                if cancel is not None and cancel.is_set():
                    finish_reason = "cancelled"
                    break
            else:
                detok.finalize()
                text, hit = stopper.feed(detok.last_segment)
                if text:
                    text_parts.append(text)
                    yield TextDelta(text, generated[-1] if generated else -1)
        except BaseException:
            if session:
                session.abort()
            raise
        if finish_reason != "stop" or not params.stop:
            tail = stopper.flush()
            if tail:
                text_parts.append(tail)
                yield TextDelta(tail, generated[-1] if generated else -1)
        decode_s = timer.since() - prefill_s
        if session:
            # generate_step runs one step ahead, so the cache may hold one token more than was
            # yielded; its offset says exactly which tokens it covers.
            session.finish((list(tokens) + seen)[: _cache_offset(prompt_cache)])
        stats = self._stats(tokens, start, generated, timer, ttft_s, decode_s, finish_reason)
        text = "".join(text_parts)
        if finish_reason == "loop" and guard is not None:  # keep the first copy, drop repeats
            generated = generated[: guard.keep_tokens]
            text = self.loaded.tokenizer.decode(generated)
        yield Completion(text, generated, stats, session.lookup if session else None)

    def _prefill(
        self,
        tokens: Sequence[int],
        start: int,
        prompt_cache: list[Any],
        session: CacheSessionLike | None,
        cancel: threading.Event | None,
    ) -> int:
        """Run `prefill_steps` to the end; return where the final piece starts."""
        position = start
        for position in self.prefill_steps(tokens, start, prompt_cache, session):  # noqa: B007
            if cancel is not None and cancel.is_set():
                break
        return position

    def prefill_steps(
        self,
        tokens: Sequence[int],
        start: int,
        prompt_cache: list[Any],
        session: CacheSessionLike | None,
    ) -> Iterator[int]:
        """Feed the prompt in bounded steps, pausing at capture positions; yield each position.

        Yields `start` first, then the position after each step. Stops before the final piece:
        at most one step long and past every capture position, it is left for the caller to
        compute with logits (`_last_logits`, or the batch generator). A caller may stop
        iterating between steps (cancellation, or to interleave other work).
        """
        n = len(tokens)
        stops = sorted({p for p in (session.capture_positions if session else []) if start < p < n})
        position = start
        step = max(1, self.settings.prefill_step_size)
        yield position
        while True:
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

    def _last_logits(self, x: mx.array, cache: list[Any]) -> mx.array:
        """Logits (1, vocab) after the last token of `x`, with the output layer on that row only."""
        model = self.loaded.model
        inner, head = _inner_transformer(model), _output_head(model)
        if inner is not None and head is not None:
            return head(inner(x, cache=cache)[:, -1:, :])[:, -1, :]
        return model(x, cache=cache)[:, -1, :]

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

    def _stats(
        self,
        tokens: Sequence[int],
        start: int,
        generated: list[int],
        timer: _Timer,
        ttft_s: float,
        decode_s: float,
        finish_reason: str,
    ) -> GenerationStats:
        return GenerationStats(
            prompt_tokens=len(tokens),
            cached_tokens=start,
            recomputed_tokens=len(tokens) - start,
            generated_tokens=len(generated),
            ttft_s=ttft_s,
            prefill_s=ttft_s,
            decode_s=decode_s,
            peak_memory_bytes=int(mx.get_peak_memory()),
            finish_reason=finish_reason,
        )


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


# Model types whose logits are exactly the output layer applied to the inner model's hidden
# states (no soft-capping or scaling), so the layer may run on the last row alone.
_PLAIN_HEAD_TYPES = {
    "llama",
    "gemma3_text",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "olmo2",
    "smollm3",
}


def _output_head(model: Any) -> Any:
    if getattr(model, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    args = getattr(model, "args", None)
    tied = getattr(model, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(args, "tie_word_embeddings", False)
    if not tied and hasattr(model, "lm_head"):
        return model.lm_head
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return embed.as_linear if embed is not None and hasattr(embed, "as_linear") else None


def _cache_offset(prompt_cache: list[Any]) -> int:
    offsets = [getattr(c, "offset", None) for c in prompt_cache]
    known = [o for o in offsets if isinstance(o, int)]
    return min(known) if known else 0
