"""Detect a generation that has started repeating itself, so decoding can stop there.

Small models fall into loops ("The indentation level is determined by ... The indentation level
is determined by ..." until max_tokens). A loop is a tail of the generated tokens that is
periodic: the same block of `p` tokens at least twice in a row for long blocks (a whole sentence
said twice is never a good answer), more times for short ones (a list like "1, 2, 3" or a
repeated word needs more evidence). A looser loop is the same phrase coming back again and
again with different words around it ("The indentation level is determined by ... The
indentation level is computed by ..."): an n-gram seen `ngram_repeats` times. Pure; the guard
checks O(max_period) periods per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopSettings:
    min_span_tokens: int = 16  # a repeat shorter than this in total is never called a loop
    max_period: int = 96  # longest repeated block looked for (a long sentence)
    short_period: int = 6  # blocks up to this long must repeat `short_repeats` times
    short_repeats: int = 4
    long_repeats: int = 2
    ngram: int = 5  # a phrase of this many tokens...
    ngram_repeats: int = 3  # ...said this many times is a loop too


@dataclass(frozen=True)
class LoopFound:
    period: int  # tokens in the repeated block
    repeats: int  # how many whole copies of it end the sequence
    first_repeat_at: int  # index where the first redundant copy starts: keep tokens before it


def find_loop(tokens: Sequence[int], settings: LoopSettings | None = None) -> LoopFound | None:
    """The loop that `tokens` ends in, if any (shortest period first).

    A sequence ends in a loop of period p when its last `r * p` tokens are r copies of one block,
    with r >= `long_repeats` (or `short_repeats` for p <= `short_period`) and r * p >=
    `min_span_tokens`. Stopping there and dropping the copies after the first loses nothing.
    """
    s = settings or LoopSettings()
    n = len(tokens)
    for period in range(1, min(s.max_period, n // 2) + 1):
        need = s.short_repeats if period <= s.short_period else s.long_repeats
        span = max(need * period, s.min_span_tokens)
        span += (-span) % period  # whole copies only
        if span > n or tokens[n - 1] != tokens[n - 1 - period]:
            continue  # the cheap test first: most periods fail on the last token
        tail = tokens[n - span :]
        if all(tail[i] == tail[i - period] for i in range(period, span)):
            run = span
            while run + period <= n and tokens[n - run - period : n - run] == tokens[n - period :]:
                run += period
            return LoopFound(period, run // period, n - run + period)
    return None


def find_phrase_loop(
    tokens: Sequence[int], settings: LoopSettings | None = None
) -> LoopFound | None:
    """The loop of a phrase (the last `ngram` tokens) said `ngram_repeats` times; keep the text
    up to where it came back the first time."""
    s = settings or LoopSettings()
    n, g = len(tokens), s.ngram
    if n < g * s.ngram_repeats:
        return None
    last = tuple(tokens[n - g :])
    starts = [i for i in range(n - g + 1) if tuple(tokens[i : i + g]) == last]
    if len(starts) < s.ngram_repeats:
        return None
    return LoopFound(starts[1] - starts[0], len(starts), starts[1])


class LoopGuard:
    """Feed generated tokens one by one; `feed` says when the stream has started looping.

    Checks every token, so a loop is caught as soon as its last copy completes.
    """

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings or LoopSettings()
        self.tokens: list[int] = []
        self.found: LoopFound | None = None
        self._seen: dict[tuple[int, ...], int] = {}  # n-gram counts, to test phrases in O(1)

    def feed(self, token: int) -> bool:
        self.tokens.append(token)
        s, g = self.settings, self.settings.ngram
        said = 0
        if len(self.tokens) >= g:
            last = tuple(self.tokens[-g:])
            said = self._seen[last] = self._seen.get(last, 0) + 1
        if self.found is None and len(self.tokens) >= s.min_span_tokens:
            self.found = find_loop(self.tokens, s)
            if self.found is None and said >= s.ngram_repeats:
                self.found = find_phrase_loop(self.tokens, s)
        return self.found is not None

    @property
    def keep_tokens(self) -> int:
        """How many generated tokens to keep: all of them, or those before the first copy."""
        return self.found.first_repeat_at if self.found else len(self.tokens)
