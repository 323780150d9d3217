"""The retrieved passages cut into sentences, scored against a piece of text.

Both answer checks work on it: extraction (which passage sentence answers the question?) and
attribution (which passage sentence supports this answer sentence?). A sentence's score mixes
lexical evidence (the share of the text's content words, idf-weighted over the passages, that the
sentence and its neighbours contain) with meaning (cosine similarity of the bundled embedder's
vectors), so a paraphrase and an exact copy both count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ragcache.sentences import (
    Sentence,
    content_words,
    defined_terms,
    idf_weights,
    split_sentences,
    weighted_recall,
)

EmbedFn = Callable[[Sequence[str]], np.ndarray]  # texts -> unit vectors, one row each


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk as the answer checks see it: its prompt number and its text."""

    number: int  # the [n] the prompt gave it
    chunk_id: str
    title: str
    text: str
    header: str = ""  # the heading path ingest writes as the chunk's first line: never evidence
    opens_document: bool = False  # the document's first chunk: its first sentence is its lead

    def is_label(self, sentence: str) -> bool:
        """Whether `sentence` only names this passage (its heading path or title), saying nothing."""
        said = " ".join(sentence.replace(">", " ").split()).lower()
        labels = (self.header, self.title)
        return bool(said) and any(
            said in " ".join(x.replace(">", " ").split()).lower() for x in labels if x
        )


@dataclass(frozen=True)
class Quote:
    """A span of a passage: the evidence shown beside an answer sentence."""

    number: int
    chunk_id: str
    start: int  # character span in the chunk's text
    end: int
    text: str
    score: float

    def as_dict(self) -> dict[str, int | str | float]:
        return {
            "number": self.number,
            "chunk_id": self.chunk_id,
            "start": self.start,
            "end": self.end,
            "quote": self.text,
            "score": round(self.score, 3),
        }


@dataclass(frozen=True)
class EvidenceSettings:
    context_sentences: int = 1  # neighbours on each side whose words count for a sentence
    context_weight: float = 0.0  # how much the neighbours' words count beside the sentence's own


@dataclass
class _Entry:
    passage: Passage
    slot: int  # the passage's position in the index
    rank: int  # the passage's retrieval rank, 0 best
    sentence: Sentence
    index: int  # position among its passage's sentences
    words: list[str]
    context_words: list[str]
    term: str = ""  # the term the sentence's paragraph defines (`sentences.defined_terms`)


@dataclass
class EvidenceIndex:
    """Sentences of the passages, ready to be scored. Build one per question."""

    passages: Sequence[Passage]
    embed: EmbedFn | None = None
    settings: EvidenceSettings = field(default_factory=EvidenceSettings)
    ranks: Sequence[int] | None = None  # retrieval rank per passage; prompt order if not given

    def __post_init__(self) -> None:
        self.entries: list[_Entry] = []
        self.by_passage: list[list[_Entry]] = []
        for p, passage in enumerate(self.passages):
            rank = self.ranks[p] if self.ranks is not None else p
            every = split_sentences(passage.text)
            # Terms first: a term line that repeats the heading (an option documented under its
            # own heading) is dropped as a label, but still names what its description defines.
            kept = [
                (x, term)
                for x, term in zip(every, defined_terms(every), strict=True)
                if not passage.is_label(x.text)
            ]
            sentences = [x for x, _ in kept]
            terms = [term for _, term in kept]
            bags = [content_words(s.text) for s in sentences]
            own: list[_Entry] = []
            c = self.settings.context_sentences
            for i, (s, bag) in enumerate(zip(sentences, bags, strict=True)):
                around = [w for b in bags[max(0, i - c) : i + c + 1] for w in b]
                own.append(_Entry(passage, p, rank, s, i, bag, around, terms[i]))
            self.by_passage.append(own)
            self.entries.extend(own)
        self.idf = idf_weights([e.words for e in self.entries]) if self.entries else {}
        self.default_idf = max(self.idf.values(), default=1.0)  # unseen words weigh most
        self._vectors: np.ndarray | None = None

    def vectors(self) -> np.ndarray | None:
        """Unit vectors of every sentence (with its passage title, for context), computed once."""
        if self.embed is None or not self.entries:
            return None
        if self._vectors is None:
            texts = [
                f"{e.passage.title}: {e.sentence.text}" if e.passage.title else e.sentence.text
                for e in self.entries
            ]
            self._vectors = np.asarray(self.embed(texts), dtype=np.float32)
        return self._vectors

    def lexical(self, text: str) -> np.ndarray:
        """Per sentence: the idf-weighted share of `text`'s content words it contains, mixed
        with the share its neighbours contain (a definition reads with its term)."""
        needles = content_words(text)
        w = self.settings.context_weight
        idf, default = self.idf, self.default_idf
        return np.array(
            [
                (1 - w) * weighted_recall(needles, e.words, idf, default)
                + w * weighted_recall(needles, e.context_words, idf, default)
                for e in self.entries
            ],
            dtype=np.float32,
        )

    def semantic(self, vector: np.ndarray | None) -> np.ndarray:
        vectors = self.vectors()
        if vector is None or vectors is None:
            return np.zeros(len(self.entries), dtype=np.float32)
        return np.clip(vectors @ vector.astype(np.float32), 0.0, 1.0)

    def scores(
        self, text: str, vector: np.ndarray | None = None, lexical_weight: float = 0.5
    ) -> np.ndarray:
        """Combined score in [0, 1] of every sentence for `text` (an answer sentence, a question):
        `lexical_weight` of word evidence, the rest embedding cosine (word evidence alone when
        there is no embedder)."""
        lexical = self.lexical(text)
        if vector is None and self.embed is not None:
            vector = self.embed([text])[0]
        if vector is None or self.vectors() is None:
            return lexical
        w = lexical_weight
        return w * lexical + (1 - w) * self.semantic(vector)

    def quote(self, i: int, score: float, through: int | None = None) -> Quote:
        """The span of sentence `i`, or from sentence `i` to sentence `through` of the same
        passage (inclusive)."""
        first = self.entries[i]
        last = first if through is None else self.by_passage_entry(first, through)
        p = first.passage
        start, end = first.sentence.start, last.sentence.end
        return Quote(p.number, p.chunk_id, start, end, p.text[start:end], float(score))

    def by_passage_entry(self, entry: _Entry, index: int) -> _Entry:
        siblings = self.by_passage[entry.slot]
        return siblings[max(0, min(index, len(siblings) - 1))]

    def siblings(self, i: int) -> list[_Entry]:
        return self.by_passage[self.entries[i].slot]


def memoized(embed: EmbedFn, max_items: int = 50_000) -> EmbedFn:
    """`embed` with a bounded memory of texts already embedded (thread-safe).

    A popular chunk's sentences are embedded once, not on every question that retrieves it.
    """
    import threading
    from collections import OrderedDict

    memory: OrderedDict[str, np.ndarray] = OrderedDict()
    lock = threading.Lock()

    def cached(texts: Sequence[str]) -> np.ndarray:
        with lock:
            missing = list(dict.fromkeys(t for t in texts if t not in memory))
        if missing:
            rows = np.asarray(embed(missing), dtype=np.float32)
            with lock:
                for text, row in zip(missing, rows, strict=True):
                    memory[text] = row
                while len(memory) > max_items:
                    memory.popitem(last=False)
        with lock:
            out = [memory.get(t) for t in texts]
            for t in texts:
                if t in memory:
                    memory.move_to_end(t)
        found = [row for row in out if row is not None]
        if len(found) < len(out):  # evicted meanwhile by another thread: recompute
            return np.asarray(embed(list(texts)), dtype=np.float32)
        return np.stack(found) if found else np.zeros((0, 0), dtype=np.float32)

    return cached
