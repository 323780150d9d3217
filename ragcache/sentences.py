"""Split text into sentences with character spans, and compare them by their words.

Used on both sides of attribution: an answer's sentences and the retrieved chunks' sentences. A
"sentence" is also a line that stands alone in documentation (a heading, a definition-list term,
a list item, a NAME line like "git-bisect - Use binary search ..."), so the splitter breaks on
blank lines and on lines that start a list item or follow a short unpunctuated line, besides the
usual sentence ends. Pure and fast: no model, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*[A-Za-z0-9_]|[A-Za-z0-9_]")
# A sentence ends at . ! ? (or :) followed by space and something that can start a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[`*]?[A-Z0-9])")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)]|\[\d{1,2}\])\s+")
_CITATION = re.compile(r"\s*\[(\d{1,2})\]")
# An identifier: an option (`--prune`), a dotted or snake name (`core.fooBar`, `max_age`), camelCase.
_IDENTIFIER = re.compile(r"(?<![\w.-])(?:--?[a-z][\w-]*|[A-Za-z_]\w*(?:[._][\w]+)+|[a-z]+[A-Z]\w*)")

_STOPWORD_TEXT = """a an the and or but if then else of to in on at by for with from as is are was were be been
    being it its this that these those there here what which who whom whose when where why how do
    does did done can could should would will shall may might must not no yes so than too very
    you your i we our they them their he she his her me my about into over under out up down
    also just only any all each some such more most other one use used using"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def identifiers(text: str) -> set[str]:
    """The identifier-like names `text` uses (`--prune`, `core.fooBar`, `max_age`, `isDir`)."""
    return {m.group(0).rstrip(".") for m in _IDENTIFIER.finditer(text)}


def mentions(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole (case-insensitive): `pack.window` is not in
    `pack.windowMemory` nor in `pack.window.size`, but is in "pack.window=10"."""
    pattern = rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


@dataclass(frozen=True)
class Sentence:
    text: str
    start: int  # character span in the text it was cut from
    end: int
    paragraph_start: bool  # first sentence of its paragraph (or line block)


def split_sentences(text: str) -> list[Sentence]:
    """Sentences of `text` in order, each with its exact span (text[start:end] == sentence.text)."""
    out: list[Sentence] = []
    for block_start, block_end in _blocks(text):
        n_before = len(out)
        cursor = block_start
        for m in _SENTENCE_END.finditer(text, block_start, block_end):
            _append(out, text, cursor, m.start(), first=len(out) == n_before)
            cursor = m.end()
        _append(out, text, cursor, block_end, first=len(out) == n_before)
    return out


def _append(out: list[Sentence], text: str, start: int, end: int, first: bool) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start and _WORD.search(text, start, end):
        out.append(Sentence(text[start:end], start, end, first))


def _blocks(text: str) -> Iterable[tuple[int, int]]:
    """Spans of line blocks: paragraphs, and lines that stand alone (items, terms, headings)."""
    lines = text.splitlines(keepends=True)
    start = pos = 0
    previous, previous_indent, previous_alone = "", 0, False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        # A term is a short line standing alone (not a paragraph's wrapped line) with its
        # definition indented under it, or an AsciiDoc "term::".
        after_term = previous_alone and (
            previous.endswith("::") or (is_term(previous) and indent > previous_indent)
        )
        stands_alone = (
            not stripped
            or _LIST_ITEM.match(line) is not None
            or after_term
            or stripped.endswith("::")
            or _is_underline(stripped)
        )
        if stands_alone and pos > start:
            yield start, pos
            start = pos
        if not stripped or _is_underline(stripped):
            start = pos + len(line)
        starts_block = start == pos
        pos += len(line)
        is_item = _LIST_ITEM.match(line) is not None  # an item's wrapped lines are indented too
        previous, previous_indent = stripped, indent
        previous_alone = starts_block and bool(stripped) and not is_item
    if pos > start:
        yield start, pos


def is_term(line: str) -> bool:
    """A short line with no sentence end: a definition-list term, an option name (when the
    lines under it are indented)."""
    return 0 < len(line) <= 80 and not line.endswith((".", ",", ";", "!", "?"))


def defined_terms(sentences: Sequence[Sentence]) -> list[str]:
    """Per sentence: the term its paragraph defines, or "".

    Reference pages define one name per entry: a term line (`pack.window`, `--scheduler=<s>`)
    with its description under it, as the first line of the description's paragraph or as a
    block of its own right above it. Every sentence of that description is about the term,
    though only the first names it ("Defaults to 10."). Only a line that is a name counts: the
    short first line of a wrapped prose paragraph, or a list item, defines nothing.
    """
    out: list[str] = []
    term = ""
    for i, s in enumerate(sentences):
        if s.paragraph_start:
            first, newline, rest = s.text.partition("\n")
            above = sentences[i - 1] if i > 0 else None
            if newline and rest.strip() and is_name_line(first):
                term = first.strip()  # "pack.window\nThe size of the window ..."
            elif above is not None and above.paragraph_start and is_name_line(above.text):
                term = above.text.strip()  # the term is a block of its own above
            else:
                term = ""
        out.append(term)
    return out


def is_name_line(line: str) -> bool:
    """Whether a line is a reference entry's term: an identifier first (`pack.window`,
    `--format=<format>`, `-n <num>, --max-count=<num>`) and little else, no sentence end."""
    stripped = line.strip()
    return (
        is_term(stripped)
        and _LIST_ITEM.match(line) is None
        and len(stripped.split()) <= 4
        and _IDENTIFIER.match(stripped) is not None
    )


def _is_underline(line: str) -> bool:
    return len(line) >= 3 and len(set(line)) == 1 and line[0] in "=-~^*#+"


def words(text: str) -> list[str]:
    """Lower-cased word tokens (keeping inner dots and hyphens: `core.bare`, `--follow`)."""
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> list[str]:
    """Words that carry meaning; a compound (`git-bisect`, `core.bare`) also brings its parts,
    so it meets a text that spells them apart ("the git command bisect")."""
    out = []
    for w in words(text):
        if w in STOPWORDS:
            continue
        out.append(w)
        if "-" in w or "." in w:
            out.extend(p for p in re.split(r"[-.]+", w) if p and p not in STOPWORDS)
    return out


def strip_citations(text: str) -> str:
    """The sentence without its `[n]` markers."""
    return _CITATION.sub("", text).strip()


def citation_numbers(text: str) -> list[int]:
    return [int(m.group(1)) for m in _CITATION.finditer(text)]


def idf_weights(documents: Sequence[Iterable[str]]) -> dict[str, float]:
    """Smoothed inverse document frequency of each word over `documents` (bags of words)."""
    n = len(documents)
    df: dict[str, int] = {}
    for doc in documents:
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    return {w: math.log(1 + (n + 1) / (c + 0.5)) for w, c in df.items()}


def weighted_recall(
    needles: Iterable[str], haystack: Iterable[str], idf: dict[str, float], default: float
) -> float:
    """Share of `needles`' weight (idf) found in `haystack`: 1.0 when every word is there."""
    hay = set(haystack)
    hay_stems = {_stem(h) for h in hay}
    total = found = 0.0
    for w in set(needles):
        weight = idf.get(w, default)
        total += weight
        if w in hay or _stem(w) in hay_stems:
            found += weight
    return found / total if total else 0.0


def _stem(word: str) -> str:
    """A crude suffix strip so `renames` meets `renamed` (no stemmer dependency for one use)."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word
