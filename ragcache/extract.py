"""The extractive answer: the passage sentence(s) that state the answer, quoted with their source.

For a short factual question the sentence that states the fact is often the best answer a small
model can give, and it is cited to the character. The best-scoring sentence is taken with the
lead-in it needs to make sense (the definition-list term above it, e.g. the option name, or the
previous sentence when it is very short) and the sentences that continue its paragraph, up to a
length budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ragcache.evidence import EvidenceIndex, Quote
from ragcache.sentences import is_term, words


@dataclass(frozen=True)
class ExtractSettings:
    # Chosen on the tune half of the labelled questions (benchmarks/tune_answers.py).
    lexical_weight: float = 0.2  # word evidence vs embedding cosine in a sentence's score
    rank_weight: float = 0.1  # a prior for the passages retrieval ranked higher
    passage_weight: float = 1.0  # how much a passage that is about the question as a whole counts
    max_sentences: int = 3  # the answering sentence and what continues its paragraph
    max_chars: int = 360
    short_words: int = 6  # a best sentence this short brings the sentence before it


@dataclass(frozen=True)
class Extraction:
    quote: Quote
    score: float  # the best sentence's score: the answer's confidence, in [0, 1]
    # The passage's title when the quote does not name the page's subject ("Verifies the
    # connectivity ...", "This command uses ..."): shown before it, so the answer says whose.
    subject: str = ""
    # Names in the question (`core.fooBar`, `--prune`, `max_age`) that no passage mentions: the
    # documents do not describe them, whatever else matches.
    unknown_names: tuple[str, ...] = ()


def _subject(title: str, quote: str) -> str:
    """The page title to show before a quote that does not name its page's subject itself.

    Manual and reference pages describe their subject without naming it ("Verifies the
    connectivity ...", "This option ..."): the answer says whose description it is.
    """
    name = title.split()[0].split("(")[0].lower() if title.strip() else ""
    return title if name and name not in quote.lower() else ""


_NAME = re.compile(r"(?<![\w.-])(?:--?[a-z][\w-]*|[A-Za-z_]\w*(?:[._][\w]+)+|[a-z]+[A-Z]\w*)")


def unknown_names(question: str, passages_text: str) -> tuple[str, ...]:
    """The identifier-like names of `question` that `passages_text` never mentions."""
    text = passages_text.lower()
    names = {m.group(0).rstrip(".") for m in _NAME.finditer(question)}
    return tuple(sorted(n for n in names if len(n) > 3 and n.lower() not in text))


def extract_answer(
    question: str,
    index: EvidenceIndex,
    settings: ExtractSettings | None = None,
    question_vector: np.ndarray | None = None,
) -> Extraction | None:
    """The quote that best answers `question`, or None when the passages hold no sentence."""
    s = settings or ExtractSettings()
    if not index.entries:
        return None
    base = index.scores(question, question_vector, s.lexical_weight)
    prior = np.array([s.rank_weight / (1 + e.rank) for e in index.entries], dtype=np.float32)
    if s.passage_weight:
        prior += s.passage_weight * _passage_scores(index, base)
    best = int(np.argmax(base + prior))
    siblings = index.siblings(best)
    entry = index.entries[best]
    first = entry.index
    if first > 0:
        before = siblings[first - 1]
        if entry.sentence.paragraph_start:
            gap = entry.passage.text[before.sentence.end : entry.sentence.start]
            if is_term(before.sentence.text) and "\n\n" not in gap:
                first -= 1  # the option or term the definition right under it is about
        elif len(words(entry.sentence.text)) < s.short_words:  # "Defaults to 50." needs context
            first -= 1
    last = entry.index
    chars = entry.sentence.end - siblings[first].sentence.start
    while (
        last + 1 < len(siblings)
        and last - entry.index + 1 < s.max_sentences
        and not siblings[last + 1].sentence.paragraph_start
        and chars + len(siblings[last + 1].sentence.text) <= s.max_chars
    ):
        last += 1
        chars = siblings[last].sentence.end - siblings[first].sentence.start
    start_entry = best - (entry.index - first)
    quote = index.quote(start_entry, float(base[best]), through=last)
    subject = _subject(entry.passage.title, quote.text)
    unknown = unknown_names(question, "\n".join(p.text for p in index.passages))
    return Extraction(quote, float(base[best]), subject, unknown)


def _passage_scores(index: EvidenceIndex, base: np.ndarray, top: int = 2) -> np.ndarray:
    """Per sentence: the mean of the best `top` sentence scores of its passage, so a sentence
    from a passage that is about the question beats a lone match in a passage about something
    else."""
    out = np.zeros_like(base)
    start = 0
    for sentences in index.by_passage:
        end = start + len(sentences)
        if end > start:
            out[start:end] = float(np.sort(base[start:end])[-top:].mean())
        start = end
    return out
