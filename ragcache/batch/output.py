"""The answers file: one JSON record per line, appended atomically, resumable.

Each record goes out in a single `os.write` on an O_APPEND descriptor (then fsync), so a killed
process leaves whole lines only; a torn tail from a power cut is cut off when the file is
reopened. Reopening keeps answers and input errors (a rerun would read those lines the same way)
and drops failures so the rerun tries those questions again.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragcache.batch.formats import INPUT_ERRORS
from ragcache.errors import InvalidRequestError


class OutputNotWritableError(InvalidRequestError):
    """The answers file cannot be created, read back or appended to."""


@dataclass(frozen=True)
class Resumed:
    """What an existing answers file already holds."""

    answered: frozenset[str] = field(default_factory=frozenset)  # ids with an answer
    input_error_lines: frozenset[int] = field(default_factory=frozenset)
    dropped: int = 0  # failure records and torn lines removed, to be retried


def _classify(line: str) -> tuple[str, Any] | None:
    """("answer", id) | ("input_error", line) | None for a record to drop."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    error = record.get("error")
    if error is None and isinstance(record.get("id"), str):
        return "answer", record["id"]
    if isinstance(error, dict) and error.get("type") in INPUT_ERRORS:
        return "input_error", record.get("line")
    return None


def _unwritable(path: Path, exc: OSError) -> OutputNotWritableError:
    return OutputNotWritableError(
        f"cannot write the answers file {path}: {exc.strerror or exc}",
        hint="choose a path in a folder that exists and that you may write to",
    )


class AnswerLog:
    """An answers file open for appending. `append` is thread-safe."""

    def __init__(self, path: Path, fd: int, fsync: bool = True) -> None:
        self.path = path
        self._fd = fd
        self._fsync = fsync
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, fsync: bool = True) -> tuple[AnswerLog, Resumed]:
        """Open (or create) `path`, compacting away failures and a torn tail first.

        Raises OutputNotWritableError when the file or its folder cannot be read or written; the
        existing file is then untouched. The compaction is a write-then-rename, so answers in
        the file survive a crash during it.
        """
        path = Path(path)
        if path.is_dir():
            raise OutputNotWritableError(f"the answers path {path} is a folder, not a file")
        try:
            raw = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            raise _unwritable(path, exc) from None
        text = raw.decode("utf-8", errors="replace")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]
        keep: list[str] = []
        answered: set[str] = set()
        input_errors: set[int] = set()
        dropped = 1 if tail.strip() else 0
        for line in complete:
            if not line.strip():
                continue
            kind = _classify(line)
            if kind is None:
                dropped += 1
                continue
            keep.append(line)
            if kind[0] == "answer":
                answered.add(kind[1])
            elif isinstance(kind[1], int):
                input_errors.add(kind[1])
        try:
            if dropped or tail:
                tmp = path.with_name(path.name + ".tmp")
                body = "".join(line + "\n" for line in keep).encode("utf-8")
                tmp.write_bytes(body)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(path, exc) from None
        resumed = Resumed(frozenset(answered), frozenset(input_errors), dropped)
        return cls(path, fd, fsync), resumed

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line. Raises OutputNotWritableError (disk full, ...)."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                written = os.write(self._fd, data)
                if written != len(data):  # a short write: finish it, still one line
                    os.write(self._fd, data[written:])
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                raise _unwritable(self.path, exc) from None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AnswerLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record of an answers file, in file order (for tests and the HTTP layer)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
