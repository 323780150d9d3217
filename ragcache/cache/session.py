"""One request's view of the prefix cache, and where it pauses prefill to capture state."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ragcache.cache.stats import LookupStats

if TYPE_CHECKING:
    from ragcache.cache.prefix_cache import PrefixCache
    from ragcache.cache.tree import Node


def capture_positions(
    n_tokens: int, start: int, boundaries: Iterable[int], every: int, have: Collection[int] = ()
) -> list[int]:
    """Sorted positions p, start < p < n_tokens, where prefill pauses to store state.

    Segment boundaries, plus every `every` tokens (0: none) counted from the last boundary before
    them, so long segments get checkpoints too. Positions in `have` (already checkpointed) are
    skipped. Pure.
    """
    marks = sorted({b for b in boundaries if 0 < b < n_tokens} | {0})
    points = set(marks[1:])
    if every > 0:
        for a, b in zip(marks, [*marks[1:], n_tokens], strict=True):
            points.update(range(a + every, b, every))
    return sorted(p for p in points if start < p < n_tokens and p not in have)


def span_capture_plan(window: int | None, every: int) -> tuple[int, int]:
    """(gap, tail) for `span_capture_positions` on a model without snapshot layers.

    Windowed layers need a capture at least every `window` tokens, and one half a window before
    the end so that a continuation of up to about window/2 tokens can be stored at `finish`;
    `every` (checkpoint_every_tokens, 0: off) may ask for more frequent captures.
    """
    gaps = [g for g in (window, every) if g]
    return min(gaps, default=0), (window // 2 if window else 0)


def span_capture_positions(n_tokens: int, start: int, gap: int, tail: int = 0) -> list[int]:
    """Positions for models without snapshot layers: every `gap` tokens after `start`, plus
    n_tokens - tail when the last of those is further than `tail` from the end (0: no tail).

    With windowed span layers (gap <= window) every token's K/V is stored before the window
    overwrites it; the tail capture leaves room for `tail` - (final piece) generated tokens to be
    stored exactly at `finish`. Pure.
    """
    if gap <= 0:
        return []
    points = list(range(start + gap, n_tokens, gap))
    last = points[-1] if points else start
    if tail > 0 and n_tokens - last > tail and n_tokens - tail > start:
        points.append(n_tokens - tail)
    return points


class CacheSession:
    """Restored state for one prompt, and the hooks the engine calls while it computes the rest.

    Not thread-safe on its own: one engine worker drives it. `finish` and `abort` are idempotent
    and each unpins the session's nodes exactly once.
    """

    def __init__(
        self,
        owner: PrefixCache,
        tokens: list[int],
        prompt_cache: list[Any],
        start: int,
        capture_positions: list[int],
        pinned: Node | None,
        lookup: LookupStats,
    ) -> None:
        self.prompt_cache = prompt_cache
        self.start = start
        self.capture_positions = capture_positions
        self.lookup = lookup
        self._owner, self._tokens, self._pinned = owner, tokens, pinned
        # Chunk reuse (PrefixCache.assemble): tokens from here on hold copied K/V, which is close
        # to but not what computing them gives, so they are never stored as an exact prefix (the
        # whole prompt is stored as an assembled one); `chunk_spans` are the chunks this prompt
        # computes, stored as chunk entries at finish.
        self.exact_until: int | None = None
        self.chunk_spans: list[tuple[int, int]] = []
        self._done = False
        self._mark = (start, time.perf_counter())  # last (position, time): measures prefill speed

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    def capture(self, position: int) -> None:
        """Store what the tree lacks of tokens[:position] plus a checkpoint there.

        prompt_cache must cover exactly tokens[:position]. Raises ValueError outside (0, len].
        """
        if not 0 < position <= len(self._tokens):
            raise ValueError(f"capture position {position} outside 1..{len(self._tokens)}")
        if self._done or (self.exact_until is not None and position > self.exact_until):
            return
        now = time.perf_counter()
        self._owner.measured_prefill(position - self._mark[0], now - self._mark[1])
        self._keep(self._owner.store(self, self._tokens[:position], checkpoint=True))
        self._mark = (position, time.perf_counter())

    def finish(self, all_tokens: Sequence[int]) -> None:
        """Store the prompt and (if settings.store_generated) the continuation, then unpin.

        prompt_cache must cover exactly all_tokens. Tokens whose windowed-layer K/V the live cache
        no longer holds (a continuation longer than the window allows) are not stored: the
        stored path then ends at the last capture. Stored arrays are copies: the live cache can
        be dropped or reused afterwards.
        """
        if self._done:
            return
        try:
            keep = list(all_tokens)
            if not self._owner.settings.store_generated and not self._owner.snapshots:
                keep = keep[: len(self._tokens)]  # span layers can store the prompt part alone
            if self.exact_until is not None:  # assembled: whole as such, exact only so far
                self._owner.store_assembled(self.prompt_cache, keep)
                keep = keep[: self.exact_until]
            if keep:
                self._keep(self._owner.store(self, keep, checkpoint=True))
            if self.chunk_spans:
                self._owner.store_chunks(self.prompt_cache, self._tokens, self.chunk_spans)
        finally:
            self.abort()

    def abort(self) -> None:
        """Unpin without storing anything more (cancel, error). Idempotent."""
        if self._done:
            return
        self._done = True
        if self._pinned is not None:
            self._owner.unpin(self._pinned)
            self._pinned = None

    def _keep(self, node: Node | None) -> None:
        # Pin the deepest stored node (its ancestors follow), then release the previous pin.
        if node is None or node is self._pinned:
            return
        self._owner.pin(node)
        if self._pinned is not None:
            self._owner.unpin(self._pinned)
        self._pinned = node
