"""Prompt-lookup drafting: guess the next tokens by finding the current suffix earlier in the text.

RAG answers copy spans of their sources (names, values, phrases), so when the last few tokens of
the sequence (prompt + answer so far) occurred before, the tokens that followed them there are a
good guess for what comes next. The model checks the guess in one forward pass
(`runtime.speculate`); a wrong guess costs little, a right one saves a step per token.

The index maps every n-gram (for n in [min_ngram, max_ngram]) to the position right after its
latest occurrence, updated as each token is appended: O(max_ngram) per token, no scan of the
prompt, and a lookup is max_ngram dict probes. The suffix itself is never in the index when it
is looked up, so a match is always an earlier occurrence with known continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ragcache.errors import ConfigError

# The longest draft: a verify of more than 33 rows costs more than it saves on CPU, and up to that
# many query rows attention takes the path decode takes (ragcache.attention), so a verify row has
# its decode step's bits.
MAX_DRAFT = 32


@dataclass(frozen=True)
class LookupSettings:
    min_ngram: int = 2  # a single token repeats too often to predict anything
    max_ngram: int = 4  # longer suffixes first: they predict better
    max_draft: int = 8  # the verify pass costs little more than a step up to about 8 tokens here
    initial_draft: int = 4
    # Whether drafting pays is measured per sequence: after this many steps that checked a draft
    # and as many that had none (a plain decode step), drafting goes on only while its tokens
    # per second beat the plain steps' by `min_gain`; otherwise the sequence stops drafting and
    # decodes in the batch. On this CPU a verify's attention computes one exp per row, head and
    # key, so 4 rows cost 1.4-1.7x a step (SmolLM2, Gemma 3 at ~960 tokens): a sequence that
    # accepts little is slower drafting than not. 0: never judged.
    judge_after: int = 8
    min_gain: float = 1.0
    # Kept across finished sequences too (`DraftRecord`): where it says drafting does not pay,
    # new sequences decode without drafts but one in `probe_every`. 1: every sequence drafts.
    probe_every: int = 4

    def validate(self) -> LookupSettings:
        """Raise ConfigError on values drafting cannot use; return self."""
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(
                f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}"
            )
        if self.max_draft > MAX_DRAFT:
            raise ConfigError(
                f"max_draft {self.max_draft} is above {MAX_DRAFT}: a verify that long costs more "
                "than it can save (and long prefill attention is computed differently)"
            )
        if self.judge_after < 0 or not self.min_gain > 0:  # (NaN is not > 0)
            raise ConfigError(
                f"judge_after must be >= 0 and min_gain > 0, got {self.judge_after} and "
                f"{self.min_gain}"
            )
        if self.probe_every < 1:
            raise ConfigError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.max_draft < 1 or self.initial_draft < 1:
            raise ConfigError(
                f"draft lengths must be >= 1, got max_draft {self.max_draft}, "
                f"initial_draft {self.initial_draft}",
                hint="turn speculation off instead (speculation='off', --no-speculate)",
            )
        return self


class PromptLookup:
    """The n-gram index of one growing token sequence, and the drafts it suggests."""

    def __init__(self, tokens: Sequence[int], settings: LookupSettings | None = None) -> None:
        self.settings = s = settings or LookupSettings()
        s.validate()
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add a token; index the n-grams that end right before it (their continuation is it)."""
        seq = self.tokens
        end = len(seq)
        for n in range(self.settings.min_ngram, self.settings.max_ngram + 1):
            if end >= n:
                self._after[tuple(seq[end - n : end])] = end
        seq.append(token)

    def draft(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the longest earlier occurrence of the current
        suffix; [] when no suffix of at least min_ngram tokens occurred before."""
        seq = self.tokens
        end = len(seq)
        if length < 1:
            return []
        for n in range(min(self.settings.max_ngram, end), self.settings.min_ngram - 1, -1):
            at = self._after.get(tuple(seq[end - n : end]))
            if at is not None:
                return seq[at : min(at + length, end)]
        return []


class DraftLength:
    """The draft length, adapted to how much of the recent drafts the model accepted: grow after
    a fully accepted draft, shrink after a mostly rejected one (a rejected token is wasted work
    in the verify pass)."""

    def __init__(self, settings: LookupSettings) -> None:
        self.max = settings.max_draft
        self.value = max(1, min(settings.initial_draft, self.max))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.value = min(self.max, self.value + 2)
        elif accepted * 2 < drafted:
            self.value = max(1, self.value - 1)


def _verdict(steps: DraftPayoff | DraftRecord, least: int, min_gain: float) -> bool | None:
    """Whether drafted steps gave at least `min_gain` times the plain steps' tokens per second;
    None until both kinds were seen `least` times (always when `least` is 0)."""
    if least == 0 or steps.drafted_steps < least or steps.plain_steps < least:
        return None
    drafted_rate = steps.drafted_out / steps.drafted_s if steps.drafted_s > 0 else float("inf")
    plain_rate = steps.plain_steps / steps.plain_s if steps.plain_s > 0 else float("inf")
    return drafted_rate >= min_gain * plain_rate


@dataclass
class DraftPayoff:
    """Seconds per token of the steps that checked a draft against those of the steps that had
    none, for one sequence: whether drafting pays, measured where it runs."""

    judge_after: int
    min_gain: float = 1.0
    drafted_s: float = 0.0
    drafted_steps: int = 0
    drafted_out: int = 0  # tokens those steps decoded (accepted + the model's own)
    plain_s: float = 0.0
    plain_steps: int = 0
    gave_up: bool = False  # judged not to pay once: no more drafts for this sequence

    def add(self, seconds: float, drafted: int, out: int) -> None:
        if drafted:
            self.drafted_s += seconds
            self.drafted_steps += 1
            self.drafted_out += out
        else:
            self.plain_s += seconds
            self.plain_steps += 1
        self.gave_up = self.gave_up or self.pays is False

    @property
    def wants_plain_step(self) -> bool:
        """Enough drafted steps were timed but too few without a draft (a repetitive answer
        finds a draft nearly every step): the next step skips its draft so drafting is judged."""
        n = self.judge_after
        return n > 0 and not self.gave_up and self.drafted_steps >= n and self.plain_steps < n

    @property
    def pays(self) -> bool | None:
        """False once both kinds of step were seen `judge_after` times and drafted steps gave
        fewer than `min_gain` times the plain steps' tokens per second; None until then."""
        return _verdict(self, self.judge_after, self.min_gain)


@dataclass
class DraftRecord:
    """What drafting measured on one model's finished sequences, for the next ones: the
    `DraftPayoff` sums of the sequences that reached a verdict of their own, each older one
    weighing `decay` times as much as the one after it, so the verdict follows the current
    workload. Once both kinds of step were seen `2 * judge_after` times (weighted) and drafted
    steps gave fewer than `min_gain` times the plain steps' tokens per second, a new sequence
    starts without drafts but one in `probe_every`; probes lift that once they outweigh the
    older record."""

    judge_after: int
    min_gain: float = 1.0
    probe_every: int = 4
    decay: float = 0.75
    drafted_s: float = 0.0
    drafted_steps: float = 0.0
    drafted_out: float = 0.0
    plain_s: float = 0.0
    plain_steps: float = 0.0
    asked: int = 0  # new sequences that asked whether to draft while it did not pay

    def __post_init__(self) -> None:
        if self.probe_every < 1 or not 0 <= self.decay < 1:
            raise ConfigError(
                f"need probe_every >= 1 and 0 <= decay < 1, got {self.probe_every}, {self.decay}"
            )

    @classmethod
    def from_settings(cls, settings: LookupSettings) -> DraftRecord:
        return cls(settings.judge_after, settings.min_gain, settings.probe_every)

    def add(self, payoff: DraftPayoff) -> None:
        """Count a finished sequence's drafted and plain steps (their tokens and seconds), if it
        was judged: each judged sequence brings `judge_after` steps of each kind at least, so a
        verdict, once reached, never falls back to none on short probes."""
        if payoff.pays is None:
            return
        k = self.decay
        self.drafted_s = k * self.drafted_s + payoff.drafted_s
        self.drafted_steps = k * self.drafted_steps + payoff.drafted_steps
        self.drafted_out = k * self.drafted_out + payoff.drafted_out
        self.plain_s = k * self.plain_s + payoff.plain_s
        self.plain_steps = k * self.plain_steps + payoff.plain_steps

    @property
    def pays(self) -> bool | None:
        """True while drafted steps give at least `min_gain` times the plain steps' tokens per
        second, False when they give fewer; None until enough steps were recorded, and always
        when `judge_after` is 0 (never judged)."""
        return _verdict(self, 2 * self.judge_after, self.min_gain)

    def start_drafting(self) -> bool:
        """Whether a new sequence drafts (ask once per sequence): yes unless the record says
        drafting does not pay, and then for one sequence in `probe_every`."""
        if self.pays is not False:
            self.asked = 0
            return True
        self.asked += 1
        return self.asked % self.probe_every == 0
