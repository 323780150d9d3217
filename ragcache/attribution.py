"""Tie each sentence of a generated answer to the passage span that supports it.

The model's own `[n]` is kept when passage n supports the sentence; otherwise the best supporting
sentence of any passage is cited instead; a sentence no passage supports keeps no citation (and
`answer_policy` decides what to do with it). A citation therefore always points at a quote that
contains the sentence's evidence, never at a number the model made up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ragcache.evidence import EvidenceIndex, Quote
from ragcache.sentences import citation_numbers, content_words, split_sentences, strip_citations


@dataclass(frozen=True)
class AttributionSettings:
    min_support: float = 0.5  # a sentence's best score must reach this to be cited
    lexical_weight: float = 0.5  # word evidence vs embedding cosine
    min_content_words: int = 2  # shorter sentences ("Yes.", "[1]") carry no claim to check


@dataclass(frozen=True)
class AttributedSentence:
    text: str  # the sentence without the model's [n] markers
    claimed: tuple[int, ...]  # the source numbers the model gave it
    quote: Quote | None  # the supporting span; None when no passage supports it
    checked: bool  # False for sentences too short to carry a claim

    @property
    def supported(self) -> bool:
        return self.quote is not None


def attribute(
    answer: str,
    index: EvidenceIndex,
    settings: AttributionSettings | None = None,
    embed_many: Callable[[list[str]], np.ndarray] | None = None,
) -> list[AttributedSentence]:
    """Attribute every sentence of `answer`. `embed_many` embeds all sentences in one call."""
    s = settings or AttributionSettings()
    pieces = [
        (strip_citations(x.text), tuple(citation_numbers(x.text))) for x in split_sentences(answer)
    ]
    pieces = [(text, claimed) for text, claimed in pieces if text]
    # A sentence that only repeats a source's label ("[6] git-log(1) Manual Page >", a small
    # model continuing the list of sources) makes no claim.
    checkable = [
        len(content_words(text)) >= s.min_content_words
        and not any(p.is_label(text) for p in index.passages)
        for text, _ in pieces
    ]
    vectors: list[np.ndarray | None] = [None] * len(pieces)
    if embed_many is not None and index.embed is not None and any(checkable):
        wanted = [i for i, ok in enumerate(checkable) if ok]
        rows = embed_many([pieces[i][0] for i in wanted])
        for i, row in zip(wanted, rows, strict=True):
            vectors[i] = row
    out: list[AttributedSentence] = []
    for (text, claimed), ok, vector in zip(pieces, checkable, vectors, strict=True):
        if not ok or not index.entries:
            out.append(AttributedSentence(text, claimed, None, checked=False))
            continue
        scores = index.scores(text, vector, s.lexical_weight)
        out.append(AttributedSentence(text, claimed, _support(index, scores, claimed, s), True))
    return out


def _support(
    index: EvidenceIndex, scores: np.ndarray, claimed: tuple[int, ...], s: AttributionSettings
) -> Quote | None:
    if claimed:
        own = [i for i, e in enumerate(index.entries) if e.passage.number in claimed]
        if own:
            best = max(own, key=lambda i: scores[i])
            if scores[best] >= s.min_support:
                return index.quote(best, float(scores[best]))
    best = int(np.argmax(scores))
    if scores[best] >= s.min_support:
        return index.quote(best, float(scores[best]))
    return None
