"""reStructuredText (including Sphinx sources): adorned headings, directives and roles cleaned.

A small line scanner rather than docutils: Sphinx sources use directives and roles that plain
docutils rejects, and retrieval needs the prose and its headings, not a document tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingest.documents import Document
from ingest.formats.sections import SectionBuilder

if TYPE_CHECKING:
    from ingest.formats import FileRef

_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LITERAL = re.compile(r"``([^`]+)``")
_REF = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`_{1,2}")
# Directives whose body is markup, not prose: dropped with their indented block.
_DROP = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "only", "testsetup",
         "testcleanup", "raw", "include", "image", "figure", "literalinclude", "tabularcolumns"}  # fmt: skip


@dataclass(frozen=True)
class Heading:
    """A heading found in the raw lines: where it starts, how many lines it spans, its level."""

    line: int
    n_lines: int
    level: int
    title: str


def find_headings(lines: list[str]) -> list[Heading]:
    """Headings in document order; levels follow the order in which adornment styles first appear."""
    styles: list[tuple[str, bool]] = []
    found: list[Heading] = []
    i = 0
    while i < len(lines):
        over = _ADORNMENT.match(lines[i])
        if over and i + 2 < len(lines) and lines[i + 1].strip() and _is_under(lines[i + 2], over):
            style, title, n = (over.group(1), True), lines[i + 1].strip(), 3
        elif (
            lines[i].strip()
            and not _ADORNMENT.match(lines[i])
            and not lines[i].startswith((" ", "\t"))
            and i + 1 < len(lines)
            and (under := _ADORNMENT.match(lines[i + 1]))
            and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())
            and (i == 0 or not lines[i - 1].strip())
        ):
            style, title, n = (under.group(1), False), lines[i].strip(), 2
        else:
            i += 1
            continue
        if style not in styles:
            styles.append(style)
        found.append(Heading(i, n, styles.index(style) + 1, title))
        i += n
    return found


def _is_under(line: str, over: re.Match[str]) -> bool:
    under = _ADORNMENT.match(line)
    return under is not None and under.group(1) == over.group(1)


def clean_inline(line: str) -> str:
    """Roles, literals and references reduced to their visible text."""
    line = _ROLE.sub(lambda m: _role_text(m.group(1)), line)
    line = _LITERAL.sub(r"\1", line)
    return _REF.sub(r"\1", line)


def _role_text(inner: str) -> str:
    inner = re.sub(r"\s*<[^>]*>$", "", inner) if "<" in inner else inner
    if inner.startswith("~"):  # Sphinx shows only the last component of ~a.b.c
        return inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def load(content: str, ref: FileRef, fingerprint: str) -> list[Document]:
    """One document with a section per heading; noisy directives and comments are dropped."""
    lines = content.splitlines()
    headings = {h.line: h for h in find_headings(lines)}
    out = SectionBuilder()
    i = 0
    while i < len(lines):
        if i in headings:
            h = headings[i]
            out.heading(h.level, clean_inline(h.title))
            i += h.n_lines
            continue
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive and directive.group(2) not in _DROP:
            # Keep a directive's argument (a signature, a note's first words) as text.
            if directive.group(3).strip():
                out.line(directive.group(1) + clean_inline(directive.group(3)))
            i += 1
            continue
        if directive or _COMMENT_OR_TARGET.match(line):
            i = _skip_block(lines, i)
            continue
        out.line(clean_inline(line))
        i += 1
    sections = out.finish()
    return [
        Document(
            doc_id=ref.doc_id,
            source=ref.source,
            title=out.first_heading or ref.path.name.split(".")[0],
            sections=sections,
            fingerprint=fingerprint,
        )
    ]


def _skip_block(lines: list[str], i: int) -> int:
    """Index after the directive or comment at i and its indented body."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    i += 1
    while i < len(lines) and (
        not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
    ):
        i += 1
    return i
