"""HTML: the main text and its headings; navigation, scripts and page chrome are dropped."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ingest.documents import Document
from ingest.formats.sections import SectionBuilder

if TYPE_CHECKING:
    from ingest.formats import FileRef

_NOISE = (
    "script, style, noscript, template, svg, iframe, nav, header, footer, aside, form, button, "
    "[role=navigation], [role=banner], [role=contentinfo], [aria-hidden=true]"
)
_BLOCKS = "p, li, pre, blockquote, tr, dt, dd, div, section, article, table, ul, ol, dl, br"
_HEADINGS = "h1, h2, h3, h4, h5, h6"
# Headings become marker lines so the text walk keeps them in place: \x01<level>\x02<title>\x03.
_MARK = re.compile(r"^\x01(\d)\x02(.*)\x03$")


def load(content: str, ref: FileRef, fingerprint: str) -> list[Document]:
    """One document with a section per heading of the page's main content."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(content)
    title_node = tree.css_first("title")
    page_title = title_node.text(strip=True) if title_node else ""
    root = tree.css_first("main") or tree.css_first("article") or tree.css_first("[role=main]")
    root = root or tree.body or tree.root
    if root is None:
        return []
    for node in root.css(_NOISE):
        node.decompose()
    for node in root.css(_HEADINGS):
        level = int((node.tag or "h6")[1])
        text = " ".join(node.text(deep=True, separator=" ").split())
        node.replace_with(f"\n\x01{level}\x02{text}\x03\n")
    for node in root.css(_BLOCKS):
        node.insert_after("\n\n")
    out = SectionBuilder()
    for line in root.text(deep=True, separator="").splitlines():
        mark = _MARK.match(line.strip())
        if mark:
            out.heading(int(mark.group(1)), mark.group(2))
        else:
            out.line(" ".join(line.split()))
    sections = out.finish()
    return [
        Document(
            doc_id=ref.doc_id,
            source=ref.source,
            title=page_title or out.first_heading or ref.path.stem,
            sections=sections,
            fingerprint=fingerprint,
        )
    ]
