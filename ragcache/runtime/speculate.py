"""Exact speculative decoding from prompt lookup, for one greedy sequence.

Each step feeds the last token plus a draft (`runtime.lookup`) in one forward pass, keeps the
longest prefix of the draft that the model's own greedy choice agrees with, plus the model's next
token, and trims the KV cache back to what was kept. On this CPU a forward pass is dominated by
reading the weights, so checking 8 tokens costs little more than decoding 1: every accepted token
is nearly free. Greedy only: the accepted tokens are the ones greedy decoding picks.

Only caches that can be cut back exactly are speculated on (plain KV caches, and sliding-window
caches before their window wraps, per mlx-lm's `is_trimmable`); a sequence whose cache cannot be
trimmed decodes one token per step through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ragcache.runtime.lookup import DraftLength, LookupSettings, PromptLookup


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
    ) -> None:
        """`tokens`: the sequence so far (the prompt), whose KV `kv` holds except for the last
        piece fed by `first`."""
        self.model = model
        self.kv = kv
        self.lookup = PromptLookup(tokens, settings)
        self.length = DraftLength(self.lookup.settings)
        self.stats = DraftStats()
        self.pending: int | None = None  # chosen, not yet fed to the model

    def first(self, rest: Sequence[int]) -> int:
        """Feed the prompt's final piece (its tokens are already in `lookup`); the first token."""
        logits = self.model(mx.array(list(rest))[None], cache=self.kv)
        token = int(greedy(logits[0, -1:])[0].item())  # type: ignore[arg-type]
        self._emit([token])
        return token

    def step(self, max_new: int) -> list[int]:
        """Decode at least one and at most `max_new` tokens; return them in order."""
        assert self.pending is not None and max_new >= 1
        room = draft_room(self.kv)
        draft = self.lookup.draft(min(self.length.value, max_new - 1, room))
        logits = self.model(mx.array([self.pending, *draft])[None], cache=self.kv)
        choice = cast(list[int], greedy(logits[0]).tolist())
        n = 0
        while n < len(draft) and draft[n] == choice[n]:
            n += 1
        if len(draft) > n:  # the cache holds the rejected draft tokens: cut them back off
            trim_prompt_cache(self.kv, len(draft) - n)
        self.stats.steps += 1
        self.stats.drafted += len(draft)
        self.stats.accepted += n
        self.length.update(len(draft), n)
        out = [*draft[:n], int(choice[n])]
        self._emit(out)
        return out

    def _emit(self, tokens: list[int]) -> None:
        self.lookup.extend(tokens)
        self.pending = tokens[-1]

    def cut_to(self, n_tokens: int) -> None:
        """Trim the cache so it covers at most `n_tokens` tokens (a stop inside accepted
        tokens: the cache must not hold what comes after it)."""
        offset = min(getattr(c, "offset", 0) for c in self.kv)
        if offset > n_tokens and can_trim_prompt_cache(self.kv):
            trim_prompt_cache(self.kv, offset - n_tokens)


def greedy(logits: mx.array) -> mx.array:
    """The greedy token of each row, computed as mlx-lm's batched decode computes it (argmax of
    the log-probabilities, not of the raw logits): in a low-precision dtype the normalisation can
    turn a narrow maximum into a tie, and both paths must break it the same way."""
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


def draft_room(kv: list[Any]) -> int:
    """How many draft tokens the cache can take and still be cut back exactly: unbounded for
    plain caches, up to the window for a sliding-window cache that has not wrapped (once the
    window wraps, rejected tokens would have overwritten kept ones), 0 for anything else."""
    if not can_trim_prompt_cache(kv):
        return 0
    room = 1 << 30
    for c in kv:
        window = getattr(c, "max_size", None)
        if window is not None:
            room = min(room, window - c.offset - 2)  # the last token is fed with the draft
    return max(0, room)
