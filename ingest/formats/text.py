"""Plain text: one section, paragraphs split later by the chunker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingest.documents import Document, Section

if TYPE_CHECKING:
    from ingest.formats import FileRef


def load(content: str, ref: FileRef, fingerprint: str) -> list[Document]:
    """One document whose single section is the whole text."""
    return [
        Document(
            doc_id=ref.doc_id,
            source=ref.source,
            title=ref.path.stem,
            sections=(Section((), content),),
            fingerprint=fingerprint,
        )
    ]
