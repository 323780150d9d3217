"""Format loaders: one module per format, chosen by file suffix.

A loader turns a file's content into Documents of Sections (heading path + text). It raises SkipFile
with a reason when the content cannot be used; the job records the reason and goes on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest.decode import Decoded, decode_text
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
    """The documents of one file, the parts of it (JSONL lines) that were left out, and the
    encoding its text was decoded with when that was a guess (see decode.Decoded)."""

    documents: list[Document]
    skipped: list[Skipped]
    guessed_encoding: str | None = None


# Version of the guess for text that is not UTF-8 (ingest/codepages.py). Part of such files'
# fingerprints only: a better guess re-ingests them, and only them (bumping PIPELINE_VERSION
# would re-embed every stored document, UTF-8 ones included, whose text cannot change).
LEGACY_DECODER_VERSION = "2"


def content_fingerprint(path: Path, data: bytes) -> str:
    """The hash that says whether a file changed since it was ingested."""
    digest = hashlib.sha256(data).hexdigest()
    if format_of(path) in TEXT_LOADERS or format_of(path) in JSONL_SUFFIXES:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return f"{digest}:legacy{LEGACY_DECODER_VERSION}"
    return digest


def load_documents(ref: FileRef, data: bytes, fingerprint: str) -> Loaded:
    """Parse one file's bytes into documents. Raises SkipFile for unusable content."""
    suffix = format_of(ref.path)
    if not data.strip():
        raise SkipFile("empty file")
    if suffix in BYTES_LOADERS:
        return _non_empty(BYTES_LOADERS[suffix](data, ref, fingerprint))
    if suffix in TEXT_LOADERS:
        decoded = decode_text(data)
        docs = TEXT_LOADERS[suffix](decoded.text, ref, fingerprint)
        return _non_empty(docs, _guess_of(decoded))
    if suffix in JSONL_SUFFIXES:
        decoded = decode_text(data)
        docs, lines = jsonl.load(decoded.text, ref)
        skipped = [Skipped(f"{ref.source}:{n}", reason) for n, reason in lines]
        return Loaded(docs, skipped, _guess_of(decoded))
    raise SkipFile(f"unsupported format {suffix or '(no suffix)'}")


def _guess_of(decoded: Decoded) -> str | None:
    return decoded.encoding if decoded.guessed else None


def _non_empty(docs: list[Document], guessed_encoding: str | None = None) -> Loaded:
    kept = [d for d in docs if not d.is_empty]
    if not kept:
        raise SkipFile("no text found")
    return Loaded(kept, [], guessed_encoding)
