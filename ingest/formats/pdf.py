"""PDF with pypdf: one section per page, so a chunk can cite its page."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

from ingest.documents import Document, Section, SkipFile

if TYPE_CHECKING:
    from ingest.formats import FileRef


def load(data: bytes, ref: FileRef, fingerprint: str) -> list[Document]:
    """One document, a section per page with text. Raises SkipFile for corrupt or encrypted PDFs."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    # pypdf logs every recoverable oddity as a warning; the job reports what matters itself.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise SkipFile("encrypted PDF: decrypt it first")
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            if text.strip():
                sections.append(Section((f"page {number}",), text))
        metadata: dict = dict(reader.metadata or {})
        title = str(metadata.get("/Title") or "")
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, IndexError) as exc:
        raise SkipFile(f"corrupt PDF: {exc.__class__.__name__}: {exc}") from exc
    if not sections:
        raise SkipFile("PDF has no extractable text (scanned images need OCR)")
    return [
        Document(
            doc_id=ref.doc_id,
            source=ref.source,
            title=title or ref.path.stem,
            sections=tuple(sections),
            fingerprint=fingerprint,
            metadata={"pages": len(reader.pages)},
        )
    ]
