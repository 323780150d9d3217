"""Token-aware chunking: split on structure first (sections, paragraphs, sentences), cut last.

Pure and deterministic: the same sections and tokenizer give the same chunks. A chunk never crosses
a section, carries its heading path as a header line, and holds at most `target_tokens` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest.documents import Section


class Tokens(Protocol):
    """The generator's tokenizer as the chunker needs it (no special tokens added)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


@dataclass(frozen=True)
class ChunkSettings:
    target_tokens: int = 200  # all-MiniLM-L6-v2 reads 256 word pieces; stay under it
    overlap_tokens: int = 24  # trailing paragraphs/sentences repeated at the next chunk's start
    max_header_chars: int = 160  # a deep heading path must not eat the chunk


@dataclass(frozen=True)
class Chunk:
    """A chunk's text (header + body) and where its body lies in its section."""

    text: str
    token_ids: tuple[int, ...]
    heading_path: tuple[str, ...]
    section: int  # index of the section it came from
    start: int  # body span, in characters of the section's text
    end: int


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    n_tokens: int


_BLOCK_GAP = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_GAP = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_END = ".!?"


def chunk_sections(
    sections: Sequence[Section], tokens: Tokens, settings: ChunkSettings = ChunkSettings()
) -> list[Chunk]:
    """Chunks of all sections in order. Raises ValueError if target_tokens is too small to cut."""
    if settings.target_tokens < 16 or settings.overlap_tokens >= settings.target_tokens // 2:
        raise ValueError("need target_tokens >= 16 and overlap_tokens < target_tokens / 2")
    chunks: list[Chunk] = []
    for index, section in enumerate(sections):
        chunks.extend(_chunk_section(index, section, tokens, settings))
    return chunks


def header_of(heading_path: Sequence[str], max_chars: int) -> str:
    """The line put before a chunk's body so the embedder and the generator see its context."""
    line = " > ".join(heading_path)
    if len(line) > max_chars:
        line = line[: max_chars - 1] + "…"
    return f"{line}\n\n" if line else ""


def _chunk_section(
    index: int, section: Section, tokens: Tokens, settings: ChunkSettings
) -> list[Chunk]:
    target = settings.target_tokens
    header = header_of(section.heading_path, settings.max_header_chars)
    budget = target - len(tokens.encode(header)) - 1
    if budget < target // 2:  # a header that large would starve the body: drop it
        header, budget = "", target - 1
    text = section.text
    pieces = _pieces(text, budget, tokens)
    out: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + pieces[j].n_tokens <= budget):
            total += pieces[j].n_tokens
            j += 1
        while True:  # piece counts are estimates: check the real count of the joined text
            body = text[pieces[i].start : pieces[j - 1].end]
            ids = tokens.encode(header + body)
            if len(ids) <= target:
                break
            if j - i > 1:
                j -= 1
                continue
            # A single piece that grew past the target when joined to its header: cut it smaller.
            p = pieces[i]
            excess = len(ids) - target
            pieces[i : i + 1] = _cut(text, p.start, p.end, max(8, p.n_tokens - excess - 2), tokens)
            j = i + 1
        out.append(
            Chunk(
                header + body,
                tuple(ids),
                section.heading_path,
                index,
                pieces[i].start,
                pieces[j - 1].end,
            )
        )
        if j >= len(pieces):
            break
        k, carried = j, 0
        while k - 1 > i and carried + pieces[k - 1].n_tokens <= settings.overlap_tokens:
            k -= 1
            carried += pieces[k].n_tokens
        i = k
    return out


def _pieces(text: str, budget: int, tokens: Tokens) -> list[_Piece]:
    """Paragraphs that fit the budget; longer ones as sentences, and sentences longer than the
    budget cut at line breaks, spaces or (last resort) between tokens."""
    out: list[_Piece] = []
    for b0, b1 in _spans(text, 0, len(text), _BLOCK_GAP):
        n = len(tokens.encode(text[b0:b1]))
        if n <= budget:
            out.append(_Piece(b0, b1, n))
            continue
        for s0, s1 in _spans(text, b0, b1, _SENTENCE_GAP):
            n = len(tokens.encode(text[s0:s1]))
            out.extend([_Piece(s0, s1, n)] if n <= budget else _cut(text, s0, s1, budget, tokens))
    return out


def _spans(text: str, start: int, end: int, gap: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-blank spans of text[start:end] between matches of `gap`, trimmed of whitespace."""
    out = []
    for m in [*gap.finditer(text, start, end), None]:
        stop = m.start() if m else end
        a, b = _trim(text, start, stop)
        if b > a:
            out.append((a, b))
        if m:
            start = m.end()
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _cut(text: str, b0: int, b1: int, budget: int, tokens: Tokens) -> list[_Piece]:
    """Cut text[b0:b1] into pieces of <= budget tokens, each cut where `_best_cut` says."""
    ids, offsets = tokens.encode_offsets(text[b0:b1])
    starts = [b0 + s for s, _ in offsets]
    out: list[_Piece] = []
    i = 0
    while i < len(ids):
        j = len(ids) if len(ids) - i <= budget else _best_cut(text, starts, i, budget)
        a, b = _trim(text, starts[i] if out else b0, starts[j] if j < len(ids) else b1)
        if b > a:
            out.append(_Piece(a, b, j - i))
        i = j
    return out


def _best_cut(text: str, starts: list[int], i: int, budget: int) -> int:
    """Token index to cut before, in (i + budget/2, i + budget], that moves the text forward."""
    lo, hi = i + max(1, budget // 2), i + budget
    best: dict[int, int] = {}
    for j in range(hi, lo - 1, -1):
        c = starts[j]
        if c <= starts[i]:
            continue  # inside one multi-byte character: cutting here would make an empty piece
        before, at = text[c - 1], text[c]
        if (at.isspace() and before in _SENTENCE_END) or (
            before.isspace() and c >= 2 and text[c - 2] in _SENTENCE_END
        ):
            return j
        if "\n" in (before, at):
            best.setdefault(1, j)
        elif before.isspace() or at.isspace():
            best.setdefault(2, j)
        else:
            best.setdefault(3, j)
    if best:
        return best[min(best)]
    j = hi
    while j < len(starts) and starts[j] <= starts[i]:
        j += 1  # a run of byte tokens of one character: step past it
    return j
