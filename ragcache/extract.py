"""The extractive answer: the passage sentence(s) that state the answer, quoted with their source.

For a short factual question the sentence that states the fact is often the best answer a small
model can give, and it is cited to the character. The best-scoring sentence is taken with the
lead-in it needs to make sense (the definition-list term above it, e.g. the option name, or the
previous sentence when it is very short) and the sentences that continue its paragraph, up to a
length budget. In a reference entry (a term line such as `pack.window` with its description) each
sentence of the description is evidence for the term, so "Defaults to 10." answers a question
about `pack.window` and not one about `pack.windowMemory`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ragcache.evidence import EvidenceIndex, Quote
from ragcache.sentences import identifiers, is_term, words


@dataclass(frozen=True)
class ExtractSettings:
    # Chosen on the tune half of the labelled questions (benchmarks/tune_answers.py).
    lexical_weight: float = 0.2  # word evidence vs embedding cosine in a sentence's score
    rank_weight: float = 0.1  # a prior for the passages retrieval ranked higher
    passage_weight: float = 1.0  # how much a passage that is about the question as a whole counts
    # A document's opening prose sentence states what the document is about (an FAQ answer's
    # first sentence): a "why"/"what is" question is answered from there more often than from a
    # sentence deep inside that happens to share its words. A label line (a NAME line) is not
    # favoured: see _is_prose.
    lead_weight: float = 1.0
    # A sentence of the entry that defines a name the question asks about (the description
    # under the term line `pack.window`, not under `pack.windowMemory`) is evidence for it,
    # and counts toward the answer's confidence.
    defined_name_weight: float = 0.1
    max_sentences: int = 3  # the answering sentence and what continues its paragraph
    # A later sentence of the same definition (up to the next term line) that scores at least
    # this for the question is quoted too, after an ellipsis: "The default is initial." ends a
    # long description. None: never.
    more_above: float | None = 0.2
    max_chars: int = 360
    short_words: int = 6  # a best sentence this short brings the sentence before it


@dataclass(frozen=True)
class Extraction:
    quote: Quote
    score: float  # the best sentence score for the question: the answer's confidence, in [0, 1]
    # The passage's title when the quote does not name the page's subject ("Verifies the
    # connectivity ...", "This command uses ..."): shown before it, so the answer says whose.
    subject: str = ""
    # Names in the question (`core.fooBar`, `--prune`, `max_age`) that no passage mentions: the
    # documents do not describe them, whatever else matches.
    unknown_names: tuple[str, ...] = ()
    more: Quote | None = None  # a later sentence of the same definition that also answers


def _subject(title: str, quote: str) -> str:
    """The page title to show before a quote that does not name its page's subject itself.

    Manual and reference pages describe their subject without naming it ("Verifies the
    connectivity ...", "This option ..."): the answer says whose description it is.
    """
    name = title.split()[0].split("(")[0].lower() if title.strip() else ""
    return title if name and name not in quote.lower() else ""


# A proper name: a capitalised word (a product, a project, a language: "Kubernetes", "GitHub",
# "Moore-Penrose") that does not open a sentence; a possessive "'s" is not part of it.
_PROPER = re.compile(r"(?<![\w.'-])([A-Z][a-z]*[A-Za-z\d]*(?:-[A-Z][\w]*)*)(?:'s)?(?![\w-])")
_SENTENCE_START = re.compile(r"(?:^|[.?!:;\"(]\s*)$")


def unknown_names(question: str, passages_text: str) -> tuple[str, ...]:
    """The identifier-like and proper names of `question` that `passages_text` never mentions.

    The sources cannot be about a thing they never name: a question about Flask's default port
    asked of the Python manual is not answered by a passage about sockets, however close.
    """
    text = passages_text.lower()
    names = identifiers(question)
    names |= {
        m.group(1)
        for m in _PROPER.finditer(question)
        if not _SENTENCE_START.search(question[: m.start()]) and len(m.group(1)) > 1
    }
    return tuple(sorted(n for n in names if len(n) > 1 and n.lower() not in text and _long(n)))


def _long(name: str) -> bool:
    """Short identifiers (`-v`, `ab`) are too common to tell anything by their absence."""
    return len(name) > 3 or name[:1].isupper()


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
    if s.defined_name_weight:
        base = np.minimum(1.0, base + s.defined_name_weight * defines_asked_name(question, index))
    prior = np.array([s.rank_weight / (1 + e.rank) for e in index.entries], dtype=np.float32)
    if s.passage_weight:
        prior += s.passage_weight * _passage_scores(index, base)
    if s.lead_weight:
        prior += s.lead_weight * np.array(
            [
                e.index == 0 and e.passage.opens_document and _is_prose(e.sentence.text)
                for e in index.entries
            ],
            dtype=np.float32,
        )
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
    more = None
    if s.more_above is not None:
        later = _rest_of_definition(siblings, last)
        if later:
            pick = max(later, key=lambda j: base[best - entry.index + j])
            if base[best - entry.index + pick] >= s.more_above:
                more = index.quote(
                    best - entry.index + pick, float(base[best - entry.index + pick])
                )
    confidence = float(base.max())  # the best evidence anywhere, whichever sentence is quoted
    subject = _subject(entry.passage.title, quote.text)
    unknown = unknown_names(question, "\n".join(p.text for p in index.passages))
    return Extraction(quote, confidence, subject, unknown, more)


def defines_asked_name(question: str, index: EvidenceIndex) -> np.ndarray:
    """Per sentence: 1.0 when its entry's term is one of the names the question uses."""
    asked = {n.lower() for n in identifiers(question)}
    if not asked:
        return np.zeros(len(index.entries), dtype=np.float32)
    return np.array(
        [bool(asked & {n.lower() for n in identifiers(e.term)}) for e in index.entries],
        dtype=np.float32,
    )


def _is_prose(sentence: str) -> bool:
    """Whether a sentence ends like one. A label line (a manual's NAME line "git-grep - Print
    lines matching a pattern", a heading) names what its whole page is about: it answers a
    question about the page on its own match, and must not outrank the line deep in the page
    that answers a question about one of its options."""
    return sentence.rstrip().rstrip(")\"'`*").endswith((".", "!", "?"))


def _rest_of_definition(siblings: list, last: int) -> list[int]:
    """Indices of the sentences after `last` up to the next term line (the next definition)."""
    out = []
    for j in range(last + 1, len(siblings)):
        if siblings[j].sentence.paragraph_start and is_term(siblings[j].sentence.text):
            break
        out.append(j)
    return out


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
