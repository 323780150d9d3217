"""What loaders produce and what the job reports about files it could not use."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Section:
    """A run of text under one heading path; chunks never cross a section boundary."""

    heading_path: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Document:
    """One logical document: a file, or one record of a JSONL file."""

    doc_id: str  # stable key in the store: relative path, plus "#<id>" for JSONL records
    source: str  # absolute path (plus "#<id>"), for citations and for --sync
    title: str
    sections: tuple[Section, ...]
    fingerprint: str  # hash of the raw content this document came from
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not any(s.text.strip() for s in self.sections)


@dataclass(frozen=True)
class Skipped:
    """A file or record left out of the job, with a reason a person can act on."""

    path: str
    reason: str


@dataclass(frozen=True)
class GuessedEncoding:
    """A file ingested in a legacy encoding that was guessed (neither a byte-order mark nor valid
    UTF-8 said what it is): worth a look if its text reads oddly."""

    path: str
    encoding: str


class SkipFile(Exception):
    """Raised by a loader when a file cannot be used; the job records it and goes on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
