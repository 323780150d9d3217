"""Markdown: ATX and setext headings give the heading path; fenced code is kept as text."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ingest.documents import Document
from ingest.formats.sections import SectionBuilder

if TYPE_CHECKING:
    from ingest.formats import FileRef

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")


def load(content: str, ref: FileRef, fingerprint: str) -> list[Document]:
    """One document with a section per heading."""
    lines = _strip_front_matter(content.splitlines())
    out = SectionBuilder()
    fence = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _FENCE.match(line)
        if match and (not fence or match.group(1) == fence):
            fence = "" if fence else match.group(1)
        heading = None if fence else _ATX.match(line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if heading:
            out.heading(len(heading.group(1)), heading.group(2))
        elif not fence and line.strip() and _SETEXT.match(nxt) and not _SETEXT.match(line):
            out.heading(1 if nxt.strip().startswith("=") else 2, line.strip())
            i += 1  # the underline
        else:
            out.line(line)
        i += 1
    sections = out.finish()
    return [
        Document(
            doc_id=ref.doc_id,
            source=ref.source,
            title=out.first_heading or ref.path.stem,
            sections=sections,
            fingerprint=fingerprint,
        )
    ]


def _strip_front_matter(lines: list[str]) -> list[str]:
    # YAML front matter is metadata for site generators, not prose to retrieve.
    if lines and lines[0].strip() == "---":
        for j in range(1, min(len(lines), 200)):
            if lines[j].strip() in ("---", "..."):
                return lines[j + 1 :]
    return lines
