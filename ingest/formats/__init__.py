"""Format loaders: one module per format, chosen by file suffix.

A loader turns a file's content into Documents of Sections (heading path + text). It raises SkipFile
with a reason when the content cannot be used; the job records the reason and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest.decode import decode_text
from ingest.documents import Document, SkipFile, Skipped
from ingest.formats import html, jsonl, markdown, pdf, rst, text


@dataclass(frozen=True)
class FileRef:
    """A file the job will read, with the keys its documents get in the store."""

    path: Path
    doc_id: str
    source: str


TextLoader = Callable[[str, FileRef, str], list[Document]]
BytesLoader = Callable[[bytes, FileRef, str], list[Document]]

# Suffix -> loader. Text loaders get decoded text; PDF gets the raw bytes.
TEXT_LOADERS: dict[str, TextLoader] = {
    ".txt": text.load,
    ".text": text.load,
    "": text.load,
    ".md": markdown.load,
    ".markdown": markdown.load,
    ".rst": rst.load,
    ".html": html.load,
    ".htm": html.load,
}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BYTES_LOADERS: dict[str, BytesLoader] = {".pdf": pdf.load}


def format_of(path: Path) -> str:
    """The suffix that picks the loader: '.rst.txt' (Sphinx sources) counts as '.rst'."""
    name = path.name.lower()
    if name.endswith(".rst.txt"):
        return ".rst"
    return path.suffix.lower()


def is_supported(path: Path) -> bool:
    suffix = format_of(path)
    return suffix in TEXT_LOADERS or suffix in BYTES_LOADERS or suffix in JSONL_SUFFIXES


def is_multi_document(path: Path) -> bool:
    """True for formats holding many documents (JSONL): their ids are only known after parsing."""
    return format_of(path) in JSONL_SUFFIXES


@dataclass(frozen=True)
class Loaded:
    """The documents of one file, and the parts of it (JSONL lines) that were left out."""

    documents: list[Document]
    skipped: list[Skipped]


def load_documents(ref: FileRef, data: bytes, fingerprint: str) -> Loaded:
    """Parse one file's bytes into documents. Raises SkipFile for unusable content."""
    suffix = format_of(ref.path)
    if not data.strip():
        raise SkipFile("empty file")
    if suffix in BYTES_LOADERS:
        return _non_empty(BYTES_LOADERS[suffix](data, ref, fingerprint))
    if suffix in TEXT_LOADERS:
        content, _encoding = decode_text(data)
        return _non_empty(TEXT_LOADERS[suffix](content, ref, fingerprint))
    if suffix in JSONL_SUFFIXES:
        content, _encoding = decode_text(data)
        docs, lines = jsonl.load(content, ref)
        return Loaded(docs, [Skipped(f"{ref.source}:{n}", reason) for n, reason in lines])
    raise SkipFile(f"unsupported format {suffix or '(no suffix)'}")


def _non_empty(docs: list[Document]) -> Loaded:
    kept = [d for d in docs if not d.is_empty]
    if not kept:
        raise SkipFile("no text found")
    return Loaded(kept, [])
