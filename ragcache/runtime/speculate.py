"""Exact speculative decoding from prompt lookup, for one greedy sequence.

Each step feeds the last token plus a draft (`runtime.lookup`) in one forward pass, keeps the
longest prefix of the draft that the model's own greedy choice agrees with, plus the model's next
token, and trims the KV cache back to what was kept. On this CPU a forward pass is dominated by
reading the weights, so checking 8 tokens costs little more than decoding 1: every accepted token
is nearly free. Greedy only: the accepted tokens are the ones greedy decoding picks.

Only caches that can be cut back exactly are speculated on: plain KV caches, and sliding-window
caches (`RotatingKVCache`) before and after their window wraps (`cut_back`: a multi-token step
keeps the window's other tokens ahead of the new ones, so rejected tokens come off the end). A
sequence whose cache cannot be cut back (recurrent state) is not speculated on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

from ragcache.runtime.lookup import DraftLength, DraftPayoff, LookupSettings, PromptLookup


@dataclass
class DraftStats:
    steps: int = 0  # forward passes in decode
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens the model agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SpeculativeDecoder:
    """Greedy decode of one sequence with prompt-lookup drafts, on its own KV cache."""

    def __init__(
        self,
        model: Any,
        kv: list[Any],
        tokens: Sequence[int],
        settings: LookupSettings | None = None,
        stats: DraftStats | None = None,
        payoff: DraftPayoff | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`tokens`: the sequence so far (the prompt), whose KV `kv` holds except for the last
        piece fed by `first`. `stats`, `payoff`: the counts and timings of an earlier stretch of
        the same answer. `clock`: what times the steps for `payoff`."""
        self.model = model
        self.kv = kv
        self.lookup = PromptLookup(tokens, settings)
        s = self.lookup.settings
        self.length = DraftLength(s)
        self.payoff = payoff or DraftPayoff(s.judge_after, s.min_gain)
        self.stats = stats or DraftStats()
        self.clock = clock
        self.pending: int | None = None  # chosen, not yet fed to the model

    @property
    def drafting(self) -> bool:
        """False once drafting measured slower than plain steps for this sequence (`payoff`)."""
        return not self.payoff.gave_up

    def first(self, rest: Sequence[int]) -> int:
        """Feed the prompt's final piece (its tokens are already in `lookup`); the first token."""
        logits = self.model(mx.array(list(rest))[None], cache=self.kv)
        token = int(greedy(logits[0, -1:])[0].item())  # type: ignore[arg-type]
        self._emit([token])
        return token

    def step(self, max_new: int) -> list[int]:
        """Decode at least one and at most `max_new` tokens; return them in order."""
        assert self.pending is not None and max_new >= 1
        started = self.clock()
        skip = not self.drafting or self.payoff.wants_plain_step
        draft = [] if skip else self.lookup.draft(min(self.length.value, max_new - 1))
        logits = self.model(mx.array([self.pending, *draft])[None], cache=self.kv)
        choice = cast(list[int], greedy(logits[0]).tolist())
        n = 0
        while n < len(draft) and draft[n] == choice[n]:
            n += 1
        if len(draft) > n:  # the cache holds the rejected draft tokens: cut them back off
            cut_back(self.kv, len(draft) - n)
        self.stats.steps += 1
        self.stats.drafted += len(draft)
        self.stats.accepted += n
        self.length.update(len(draft), n)
        out = [*draft[:n], int(choice[n])]
        self._emit(out)
        self.payoff.add(self.clock() - started, len(draft), len(out))
        return out

    def _emit(self, tokens: list[int]) -> None:
        self.lookup.extend(tokens)
        self.pending = tokens[-1]

    def cut_to(self, n_tokens: int) -> None:
        """Trim the cache so it covers at most `n_tokens` tokens (a stop inside accepted
        tokens: the cache must not hold what comes after it)."""
        cut_back(self.kv, cache_offset(self.kv) - n_tokens)


def greedy(logits: mx.array) -> mx.array:
    """The greedy token of each row, computed as mlx-lm's batched decode computes it (argmax of
    the log-probabilities, not of the raw logits): in a low-precision dtype the normalisation can
    turn a narrow maximum into a tie, and both paths must break it the same way."""
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


def cache_offset(prompt_cache: list[Any]) -> int:
    """The tokens every layer holds: the least of the layers' offsets (0 when none has one)."""
    offsets = [getattr(c, "offset", None) for c in prompt_cache]
    known = [o for o in offsets if isinstance(o, int)]
    return min(known) if known else 0


def can_cut_back(kv: list[Any]) -> bool:
    """Whether every layer of the cache can take a draft and be cut back exactly (`cut_back`):
    plain KV caches and sliding-window caches can, recurrent state cannot."""
    return all(_can_cut(c) for c in kv)


def _can_cut(cache: Any) -> bool:
    # A layer must count its tokens (`offset`) for a cut to be checked and for the cache to be
    # handed over (a CacheList of two KV caches is trimmable but has no offset of its own).
    if not isinstance(getattr(cache, "offset", None), int):
        return False
    if isinstance(cache, RotatingKVCache):
        return True  # a step's tokens sit at its buffer's end: see cut_back
    trimmable = getattr(cache, "is_trimmable", None)
    return bool(trimmable and trimmable())


class CannotCutBack(RuntimeError):
    """The cache no longer holds what it held before the tokens to cut were fed."""


def cut_back(kv: list[Any], n: int) -> None:
    """Drop the last `n` tokens from every layer's cache, as if they had never been fed.

    A plain KV cache only moves its offset back (mlx-lm's `trim`). A sliding-window cache
    (`RotatingKVCache`) takes a multi-token step through mlx-lm's concat path: the window's
    other tokens in temporal order, then the step's tokens at the end of the buffer. So the
    rejected tokens come off the end there too, wrapped window or not, and nothing the next token
    attends to was overwritten. A buffer longer than the window is then sliced to the tokens it
    holds: mlx-lm's next one-token write into it drops tokens from its front, and a stale tail
    left behind the cut would stay in the buffer as if it were live. A buffer of at most the
    window keeps its stale tail, as after mlx-lm's own `trim`: the next one-token write lands on
    it, and the next concat drops it (slicing the buffer at its write position before the window
    wraps; after, putting it first in temporal order and trimming it off).

    Raises CannotCutBack where a sliding-window layer overwrote a token the next token attends
    to (a wrapped window's one-token write), before any layer is changed.
    """
    if n <= 0:
        return
    for c in kv:
        if isinstance(c, RotatingKVCache):
            _check_window_cut(c, n)
        elif not _can_cut(c):
            raise CannotCutBack(f"a {type(c).__name__} layer cannot be cut back")
    for c in kv:
        if not isinstance(c, RotatingKVCache):
            c.trim(n)
            continue
        keys, values, offset, keep, max_size, idx = c.state
        end = idx - n
        if keys.shape[2] > max_size:  # a concat's buffer: mlx-lm would trim its front
            keys, values = keys[..., :end, :], values[..., :end, :]
        c.state = (keys, values, offset - n, keep, max_size, end)


def _check_window_cut(c: RotatingKVCache, n: int) -> None:
    keys, _, offset, _, max_size, idx = c.state
    # The buffer's order is temporal when it holds every token so far, or when its write
    # position is its end (a concat, or one-token writes that just reached the last slot).
    temporal = idx == offset or idx == keys.shape[2]
    # What the next token attends to besides itself: up to max_size - 1 earlier tokens.
    if not temporal or n > idx or idx - n < min(offset - n, max_size - 1):
        raise CannotCutBack(
            f"a sliding-window layer (window {max_size}, at {offset}) no longer holds the "
            f"tokens before the last {n}"
        )
    # A concat's buffer is sliced to what it keeps, and once the window has wrapped mlx-lm's
    # next one-token write needs a full window there: it would grow a shorter buffer by
    # max_size - offset slots (none, or fewer than none) and write outside it or over a kept
    # token. Only a cut into the step's own first token gets here (a verify never cuts that).
    if keys.shape[2] > max_size and offset - n >= max_size and idx - n < max_size:
        raise CannotCutBack(
            f"a sliding-window layer (window {max_size}, at {offset}) cut by {n} would keep "
            f"{idx - n} tokens, less than the window its next one-token step needs"
        )
