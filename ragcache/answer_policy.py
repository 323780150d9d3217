"""What the user reads: a generated answer that its sources support, a quote, or a plain decline.

Three modes:
- `generate`: the model's answer, each sentence attributed (`ragcache.attribution`); sentences no
  passage supports are dropped, and an answer left with none is declined.
- `extract`: the passage sentence(s) that answer the question (`ragcache.extract`), quoted.
- `auto`: the generated answer when every sentence of it that makes a claim is supported, else the
  quote.
Every mode declines when the best evidence for the question scores under `decline_below`
(calibrated on the tuning half of the labelled questions), so a question the store cannot answer
gets "The documents don't answer this." and the closest sources instead of an invented value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragcache.attribution import AttributedSentence, AttributionSettings
from ragcache.evidence import Quote
from ragcache.extract import Extraction, ExtractSettings

ANSWER_MODES = ("auto", "generate", "extract")
DECLINE_TEXT = "The documents don't answer this."

# What small models say when they have no answer; such an answer is a decline, not a claim.
_NO_ANSWER = re.compile(
    r"\b(?:documents?|sources?|context|passages?)\s+(?:do(?:es)?\s*n[o']t|do(?:es)? not)\s+"
    r"(?:answer|say|mention|contain|provide)|\bI (?:do not|don't) know\b|\bnot (?:mentioned|stated) in\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AnswerPolicySettings:
    # Chosen by benchmarks/quality.py for the default model (SmolLM2-135M): its quotes beat its
    # generated answers on every measure and answer 10x sooner; `auto` pays off with models
    # that can answer.
    mode: str = "extract"
    # The question's best evidence score under which it is declined: the highest that declines
    # at most 5% of answerable tune-half questions (benchmarks/tune_answers.py).
    decline_below: float = 0.529
    decline_unknown_names: bool = True  # a name the question uses that no source mentions
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)


@dataclass(frozen=True)
class CheckedAnswer:
    text: str  # as shown: supported sentences, each followed by its [n]
    method: str  # "generated", "extracted" or "declined"
    quotes: list[Quote]  # the evidence of each cited sentence, in answer order
    dropped_sentences: int  # generated sentences removed for want of support
    confidence: float  # the question's best evidence score

    @property
    def declined(self) -> bool:
        return self.method == "declined"


def needs_generation(mode: str, extraction: Extraction | None, s: AnswerPolicySettings) -> bool:
    """Whether the model has to run at all: not to quote, nor to decline an unanswerable question."""
    return mode != "extract" and not _too_weak(extraction, s)


def _too_weak(extraction: Extraction | None, s: AnswerPolicySettings) -> bool:
    return (
        extraction is None
        or extraction.score < s.decline_below
        or (s.decline_unknown_names and bool(extraction.unknown_names))
    )


def decide(
    mode: str,
    extraction: Extraction | None,
    generated: Sequence[AttributedSentence] | None,
    s: AnswerPolicySettings,
    generated_text: str = "",
) -> CheckedAnswer:
    """The answer to show, from the extraction and (where the model ran) its checked sentences."""
    confidence = extraction.score if extraction else 0.0
    if _too_weak(extraction, s):
        return CheckedAnswer(DECLINE_TEXT, "declined", [], 0, confidence)
    assert extraction is not None
    text = _with_citation(
        f"{extraction.subject}: {extraction.quote.text}"
        if extraction.subject
        else extraction.quote.text,
        extraction.quote.number,
    )
    quotes = [extraction.quote]
    if extraction.more is not None:  # a later sentence of the same definition, after a gap
        text += " … " + _with_citation(extraction.more.text, extraction.more.number)
        quotes.append(extraction.more)
    quoted = CheckedAnswer(text, "extracted", quotes, 0, confidence)
    if mode == "extract" or generated is None:
        return quoted
    claims = [x for x in generated if x.checked]
    supported = [x for x in claims if x.quote is not None]
    said_no = bool(_NO_ANSWER.search(generated_text))
    if mode == "auto":
        if claims and len(supported) == len(claims) and not said_no:
            return _generated(supported, len(claims) - len(supported), confidence)
        return quoted
    if not supported or said_no:
        return CheckedAnswer(DECLINE_TEXT, "declined", [], len(claims), confidence)
    return _generated(supported, len(claims) - len(supported), confidence)


def _generated(
    supported: Sequence[AttributedSentence], dropped: int, confidence: float
) -> CheckedAnswer:
    """Supported sentences with their [n]; a sentence resting on the same quote as an earlier
    one says the same thing again (a small model's near-repeat) and is dropped."""
    parts, quotes, seen = [], [], set()
    for x in supported:
        assert x.quote is not None
        key = (x.quote.number, x.quote.start)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        parts.append(_with_citation(x.text, x.quote.number))
        quotes.append(x.quote)
    return CheckedAnswer(" ".join(parts), "generated", quotes, dropped, confidence)


def _with_citation(sentence: str, number: int) -> str:
    """`It is so [2].`: the marker goes before the sentence's closing punctuation."""
    text = _one_line(sentence)
    end = len(text.rstrip(".!?:;"))
    return f"{text[:end]} [{number}]{text[end:]}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
