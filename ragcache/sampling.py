"""Sampling parameters and stop-string matching for streamed generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragcache.errors import InvalidRequestError

SPECULATION_MODES = ("lookup", "off")
# "epic": chunks computed before in other prompts have their K/V copied into this one, their
# first tokens recomputed (ragcache.cache.chunk_kv; close to, not the same as, computing them);
# "off": only exact prefix reuse.
CHUNK_REUSE_MODES = ("off", "epic")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy: the mode the cache's exactness guarantee is stated for
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_loops: bool = True  # end (finish_reason "loop") when the text starts repeating itself
    # "lookup": greedy decoding drafts tokens from the prompt and verifies them in one pass
    # (ragcache.runtime.speculate; the tokens are the same); "off": one token per step.
    speculation: str = "lookup"
    chunk_reuse: str = "off"

    def validate(self) -> SamplingParams:
        """Raise InvalidRequestError on out-of-range values; return self for chaining."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidRequestError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        if self.speculation not in SPECULATION_MODES:
            raise InvalidRequestError(
                f"unknown speculation mode {self.speculation!r}",
                hint="one of: " + ", ".join(SPECULATION_MODES),
            )
        if self.chunk_reuse not in CHUNK_REUSE_MODES:
            raise InvalidRequestError(
                f"unknown chunk reuse mode {self.chunk_reuse!r}",
                hint="one of: " + ", ".join(CHUNK_REUSE_MODES),
            )
        return self


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    Text that could be the start of a stop string is held back until the next token decides.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stop:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
        if hits:
            at = min(hits)[0]
            emit, self.pending = self.pending[:at], ""
            return emit, True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        emit = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return emit, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def make_request_sampler(params: SamplingParams) -> Callable[[Any], Any]:
    """A sampler that owns its randomness when the request has a seed.

    In a batch, requests share the global random state, so a seed set globally would not make
    one request reproducible; a per-request key does (split once per token).
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p, make_sampler

    if params.temperature == 0 or params.seed is None:
        return make_sampler(params.temperature, params.top_p)
    key = mx.random.key(params.seed)

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        if params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        return mx.random.categorical(logprobs * (1 / params.temperature), key=sub)

    return sample
