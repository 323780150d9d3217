"""Expand the job's PATH arguments (files, folders, globs) into files, with reasons for the rest.

Folders are walked without trusting symlinks: a directory reached twice (a symlink loop, or two links
to one folder) is walked once and the repeat reported, so a loop cannot hang the job.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from ingest.documents import Skipped
from ingest.formats import FileRef, is_supported

DEFAULT_EXCLUDES = (".*", "__pycache__", "node_modules", "*.pyc")


@dataclass(frozen=True)
class Scan:
    """What a set of PATH arguments expands to."""

    files: list[FileRef]
    skipped: list[Skipped]
    roots: list[str]  # absolute folders and files scanned
    patterns: list[str]  # absolute glob patterns scanned

    def covers(self, source: str) -> bool:
        """True if a stored document's source lies where this scan looked: --sync may delete it
        when the scan did not find it."""
        path = source.split("#", 1)[0]
        if any(path == r or path.startswith(r.rstrip("/") + "/") for r in self.roots):
            return True
        return any(PurePath(path).match(p) for p in self.patterns)


def scan_paths(paths: Sequence[str], excludes: Sequence[str] = DEFAULT_EXCLUDES) -> Scan:
    """Files under `paths` in a stable order. Never raises for a bad path: it is reported instead."""
    files: dict[str, FileRef] = {}
    skipped: list[Skipped] = []
    roots: list[str] = []
    patterns: list[str] = []
    for arg in paths:
        if glob.has_magic(arg):
            patterns.append(os.path.abspath(os.path.expanduser(arg)))
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                skipped.append(Skipped(arg, "no file matches this pattern"))
            base = _glob_base(arg)
            for match in matches:
                _add(Path(match), base, excludes, files, skipped, [])
            continue
        path = Path(arg).expanduser()
        try:
            path.stat()
        except OSError as exc:
            skipped.append(Skipped(arg, _stat_reason(exc)))
            continue
        _add(path, path.parent, excludes, files, skipped, roots)
    return Scan(sorted(files.values(), key=lambda f: f.doc_id), skipped, roots, patterns)


def _add(
    path: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
    roots: list[str],
) -> None:
    roots.append(os.path.abspath(path))
    if path.is_dir():
        _walk(path, base, excludes, files, skipped, set())
    else:
        _file(path, base, excludes, files, skipped)


def _walk(
    folder: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
    seen: set[tuple[int, int]],
) -> None:
    stat = folder.stat()
    key = (stat.st_dev, stat.st_ino)
    if key in seen:
        skipped.append(
            Skipped(str(folder), f"symlink loop: {folder} leads back to {folder.resolve()}")
        )
        return
    seen.add(key)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        skipped.append(Skipped(str(folder), f"cannot list folder: {exc.strerror}"))
        return
    for entry in entries:
        path = Path(entry.path)
        if _excluded(path, base, excludes):
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
            path.stat()
        except OSError as exc:
            skipped.append(Skipped(str(path), _stat_reason(exc)))
            continue
        if is_dir:
            _walk(path, base, excludes, files, skipped, seen)
        else:
            _file(path, base, excludes, files, skipped)


def _file(
    path: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
) -> None:
    if _excluded(path, base, excludes):
        return
    if not path.is_file():
        skipped.append(Skipped(str(path), "not a regular file"))
        return
    if not is_supported(path):
        skipped.append(Skipped(str(path), f"unsupported format {path.suffix or '(no suffix)'}"))
        return
    doc_id = _relative(path, base)
    files.setdefault(doc_id, FileRef(path=path, doc_id=doc_id, source=os.path.abspath(path)))


def _relative(path: Path, base: Path) -> str:
    # The id keeps the root folder's own name, so two corpora in one table do not collide.
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base)).as_posix()
    except ValueError:
        return path.name


def _excluded(path: Path, base: Path, excludes: Sequence[str]) -> bool:
    rel = _relative(path, base)
    return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(rel, p) for p in excludes)


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    plain = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*plain).parent if plain else Path(".")


def _stat_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop: the link points back to itself"
    if exc.errno == errno.ENOENT:
        return "does not exist (or is a broken symlink)"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot read: {exc.strerror}"
