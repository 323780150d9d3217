"""JSONL: one document per line, a text field plus metadata; bad lines are skipped one by one."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from ingest.documents import Document, Section, SkipFile

if TYPE_CHECKING:
    from ingest.formats import FileRef

TEXT_FIELD = "text"
ID_FIELD = "id"
TITLE_FIELD = "title"


def load(content: str, ref: FileRef) -> tuple[list[Document], list[tuple[int, str]]]:
    """Documents and (line number, reason) for each line left out. Raises SkipFile if none is usable."""
    docs: list[Document] = []
    skips: list[tuple[int, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skips.append((number, f"invalid JSON: {exc.msg}"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
            skips.append((number, f"no string field {TEXT_FIELD!r}"))
            continue
        if not record[TEXT_FIELD].strip():
            skips.append((number, f"empty {TEXT_FIELD!r}"))
            continue
        key = str(record.get(ID_FIELD, number))
        if key in seen:
            skips.append((number, f"duplicate id {key!r}: the first one is kept"))
            continue
        seen.add(key)
        metadata = {k: v for k, v in record.items() if k not in (TEXT_FIELD, ID_FIELD, TITLE_FIELD)}
        docs.append(
            Document(
                doc_id=f"{ref.doc_id}#{key}",
                source=f"{ref.source}#{key}",
                title=str(record.get(TITLE_FIELD) or key),
                sections=(Section((), record[TEXT_FIELD]),),
                # Per record, so editing one line re-embeds that record only.
                fingerprint=hashlib.sha256(line.strip().encode()).hexdigest(),
                metadata=metadata,
            )
        )
    if not docs and skips:
        raise SkipFile(
            f"no usable line ({len(skips)} bad; first: line {skips[0][0]}: {skips[0][1]})"
        )
    return docs, skips
