"""Expand the job's PATH arguments (files, folders, globs) into files, with reasons for the rest.

Folders are walked without trusting symlinks: a directory reached twice (a symlink loop, or two links
to one folder) is walked once and the repeat reported, so a loop cannot hang the job.
What is left out falls in three lists: `missing` PATH arguments (the job refuses to start, see
require_found), `skipped` paths that ingest meant to read and could not (the job is partial), and
`ignored` files of kinds ingest never reads, met in a folder or a glob (.css, .png: not a failure).
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ingest.documents import Skipped
from ingest.formats import FileRef, is_supported
from ragcache.errors import RagcacheError

DEFAULT_EXCLUDES = (".*", "__pycache__", "node_modules", "*.pyc")
# A PATH argument that is not there is a typo or a wrong folder, not a file to skip.
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR)


class SourceNotFoundError(RagcacheError):
    """A PATH argument does not exist: the job stops before it opens or creates the store."""

    exit_code = 66  # EX_NOINPUT (sysexits.h): "an input file did not exist"
    http_status = 404


@dataclass(frozen=True)
class Scan:
    """What a set of PATH arguments expands to."""

    files: list[FileRef]
    skipped: list[Skipped]
    roots: list[str]  # absolute folders and files scanned
    patterns: list[str]  # absolute glob patterns scanned
    missing: list[Skipped] = field(default_factory=list)  # PATH arguments that do not exist
    ignored: list[Skipped] = field(default_factory=list)  # files of kinds ingest does not read

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
    ignored: list[Skipped] = []
    missing: list[Skipped] = []
    roots: list[str] = []
    patterns: list[str] = []
    for arg in paths:
        if glob.has_magic(arg):
            patterns.append(os.path.abspath(os.path.expanduser(arg)))
            matches = sorted(glob.glob(arg, recursive=True))
            # Kept a skip, not `missing`: with --sync an empty glob means "all of these are gone".
            if not matches:
                skipped.append(Skipped(arg, "no file matches this pattern"))
            base = _glob_base(arg)
            for match in matches:
                _add(Path(match), base, excludes, files, skipped, ignored, [])
            continue
        path = Path(arg).expanduser()
        try:
            path.stat()
        except OSError as exc:
            found = missing if exc.errno in _MISSING_ERRNOS else skipped
            found.append(Skipped(arg, _stat_reason(exc)))
            continue
        # A file named on the command line was asked for: an unsupported kind is then a skip.
        unread = ignored if path.is_dir() else skipped
        _add(path, path.parent, excludes, files, skipped, unread, roots)
    files_in_order = sorted(files.values(), key=lambda f: f.doc_id)
    return Scan(files_in_order, skipped, roots, patterns, missing, ignored)


def require_found(scan: Scan) -> None:
    """Raise SourceNotFoundError naming every PATH argument that does not exist."""
    if not scan.missing:
        return
    names = ", ".join(_shown(m.path) for m in scan.missing)
    what = "PATH does not exist" if len(scan.missing) == 1 else "PATHs do not exist"
    raise SourceNotFoundError(
        f"{what}: {names}",
        hint="check the spelling and the current folder; nothing was ingested or changed",
    )


def _shown(arg: str) -> str:
    path = os.path.expanduser(arg)
    shown = arg if os.path.isabs(path) else f"{arg} (= {os.path.abspath(path)})"
    return f"{shown}, a broken symlink" if os.path.islink(path) else shown


def _add(
    path: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
    ignored: list[Skipped],
    roots: list[str],
) -> None:
    """Add a PATH argument or glob match; files of unsupported kinds go to `ignored`."""
    roots.append(os.path.abspath(path))
    if path.is_dir():
        _walk(path, base, excludes, files, skipped, ignored, set())
    else:
        _file(path, base, excludes, files, skipped, ignored)


def _walk(
    folder: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
    ignored: list[Skipped],
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
            _walk(path, base, excludes, files, skipped, ignored, seen)
        else:
            _file(path, base, excludes, files, skipped, ignored)


def _file(
    path: Path,
    base: Path,
    excludes: Sequence[str],
    files: dict[str, FileRef],
    skipped: list[Skipped],
    ignored: list[Skipped],
) -> None:
    if _excluded(path, base, excludes):
        return
    if not path.is_file():
        skipped.append(Skipped(str(path), "not a regular file"))
        return
    if not is_supported(path):
        ignored.append(Skipped(str(path), f"unsupported format {path.suffix or '(no suffix)'}"))
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
