"""The disk tier: evicted nodes as self-describing files that any number of processes share.

Layout: `<disk_dir>/<TierIdentity.folder_name>/<entry name>.kv`, one file per node (disk_file.py),
plus `.lock`. Another model, mlx/mlx-lm version, KV quantization, dtype or format version has
another folder and is never opened. There is no shared index to rewrite: a starting process reads
the files' headers and deletes nothing but files that are really corrupt.
- Atomic: an entry is written under a unique temporary name, fsynced, and renamed over its name,
  so a reader (which takes no lock) sees a whole old or a whole new file, never a torn one.
- Locks (flock on `.lock`): renames hold it shared; budget eviction (oldest mtime first; a read
  refreshes the mtime) and dropping a corrupt file hold it exclusive, so a file is unlinked as
  corrupt only if it is still the very file whose bytes failed the checksum.
- Off the MLX thread: `write` serializes the node (a memory copy) and queues the bytes; a writer
  thread does the file work. A queued key is read from memory. `flush` waits for the queue.
- Deleting a node forgets its file (another process may hold it; the budget reclaims the space);
  inside `removing()` (invalidate, clear) the file is unlinked too.
Any write error turns the tier off with one clear message; RAM is untouched.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ragcache.cache.disk_file import (
    FORMAT_VERSION,
    PREFIX,
    SUFFIX,
    CorruptEntry,
    DiskEntry,
    DiskRef,
    TierIdentity,
    decode_entry,
    decode_header,
    encode_entry,
    header_length,
    path_key,
)
from ragcache.cache.tree import Node

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 256 << 20  # queued spills held in memory before `write` waits
SCAN_EVERY_S = 2.0  # how stale this process's view of the folder's bytes may get
STALE_TMP_S = 3600.0  # a temporary file this old is a crashed writer's
IDLE_EXIT_S = 2.0  # the writer thread ends after this long with nothing to do
EXIT_DRAIN_S = 30.0

_LIVE: weakref.WeakSet[DiskTier] = weakref.WeakSet()


@dataclass
class _Op:
    name: str
    data: bytes | None  # None: unlink the file


class DiskTier:
    """Implements the tree's LowerTier on a folder shared with other processes.

    write/read/delete come from the cache's caller, one at a time (the cache's lock); the writer
    thread shares only the queue, under this tier's own mutex, and never takes the cache's lock.
    """

    def __init__(
        self,
        root: Path,
        identity: TierIdentity,
        budget_bytes: int,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.identity = identity
        self.folder = Path(root).expanduser() / identity.folder_name
        self.max_pending_bytes = max_pending_bytes
        self.enabled = True
        self.reads = self.errors = self.evicted = 0
        self.read_bps = 0.0  # measured; 0 until the first read from a file
        self._changed = threading.Condition(threading.Lock())
        self._queue: deque[_Op] = deque()
        self._pending: dict[str, bytes] = {}  # name -> bytes queued or being written
        self._pending_bytes = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._unlink = False  # inside removing()
        self._approx_bytes = 0  # the folder's bytes at the last scan plus what was written since
        self._last_scan = -math.inf
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
            with self._flock(exclusive=False):
                pass
        except OSError as exc:
            self._turn_off(f"cannot write to {self.folder}: {exc}")
            return
        _LIVE.add(self)

    def _turn_off(self, why: str) -> None:
        with self._changed:
            if self.enabled:
                log.error("KV disk tier off: %s. The RAM cache keeps working.", why)
            self.enabled = False
            self._queue.clear()
            self._pending.clear()
            self._pending_bytes = 0
            self._changed.notify_all()

    @contextmanager
    def _flock(self, exclusive: bool) -> Iterator[None]:
        # A fresh descriptor each time, so the writer thread and a reader exclude each other too.
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- what is on disk ----------------------------------------------------------------------
    def entries(self) -> list[DiskEntry]:
        """Whole entries in the folder now (every process's), parents first (by start, then end).

        Reads headers only; a truncated or damaged file is dropped and logged. Changes nothing else.
        """
        found: list[DiskEntry] = []
        total = 0
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    head = fh.read(PREFIX.size)
                    try:
                        head += fh.read(header_length(head))
                        entry, _ = decode_header(head, size, path.name, self.identity.folder_name)
                    except CorruptEntry as exc:
                        self._drop_if_unchanged(path, fh, exc)
                        continue
            except OSError:  # removed by another process since the listing
                continue
            found.append(entry)
            total += entry.file_bytes
        self._approx_bytes = total
        return sorted(found, key=lambda e: (e.start, e.start + len(e.tokens), not e.has_checkpoint))

    def count_entries(self) -> int:
        """How many whole entries the folder holds once this process's queued writes are done."""
        self.flush()
        return len(self.entries())

    # -- LowerTier ----------------------------------------------------------------------------
    def write(self, node: Node) -> bool:
        """Queue the node's payload and checkpoint for writing; set `node.disk_ref`.

        Serializes on the caller's thread (evaluated arrays: a copy); waits while more than
        `max_pending_bytes` are queued. False when the tier is off.
        """
        if not self.enabled:
            return False
        entry, data = encode_entry(node, self.identity.folder_name)
        with self._changed:
            # Bounded, but one entry larger than the bound still goes (alone).
            while (
                self.enabled
                and self._pending_bytes
                and self._pending_bytes + len(data) > self.max_pending_bytes
            ):
                self._changed.wait()
            if not self.enabled:
                return False
            self._pending[entry.name] = data
            self._pending_bytes += len(data)
            self._enqueue(_Op(entry.name, data))
        node.disk_ref = entry.ref
        return True

    def read(self, node: Node) -> tuple[Any, Any] | None:
        """The node's (payload, checkpoint): from memory while queued, else from its file.

        None when the file is gone (another process's budget took it) or not this node's; a
        corrupt file is dropped (if unchanged since it was read), logged and counted.
        """
        ref = node.disk_ref
        if not isinstance(ref, DiskRef) or not self.enabled:
            return None
        with self._changed:
            data = self._pending.get(ref.name)
        if data is not None:  # queued: the bytes in memory, never a half-written file
            try:
                return self._matching(decode_entry(data, ref.name, self.identity.folder_name), node)
            except CorruptEntry:  # made by this process a moment ago: cannot happen
                return None
        path = self.folder / ref.name
        for _ in range(3):  # a file replaced while it was being checked is read again
            began = time.perf_counter()
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
                    try:
                        decoded = decode_entry(data, ref.name, self.identity.folder_name)
                    except CorruptEntry as exc:
                        if self._drop_if_unchanged(path, fh, exc):
                            return None
                        continue
                    with suppress(OSError, NotImplementedError):
                        os.utime(fh.fileno())  # recently used: the budget evicts it last
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.warning("cannot read KV disk file %s: %s", ref.name, exc)
                return None
            rate = len(data) / max(time.perf_counter() - began, 1e-6)
            self.read_bps = rate if not self.read_bps else 0.7 * self.read_bps + 0.3 * rate
            self.reads += 1
            return self._matching(decoded, node)
        return None

    @staticmethod
    def _matching(decoded: tuple[DiskEntry, Any, Any], node: Node) -> tuple[Any, Any] | None:
        entry, payload, checkpoint = decoded
        if entry.start != node.start or entry.tokens != node.tokens:
            log.debug("KV disk file %s holds another node; treated as a miss", entry.name)
            return None
        return payload, checkpoint

    def delete(self, node: Node) -> None:
        """Forget the node's file: a queued write of it is dropped. Inside `removing()` the file
        is unlinked as well (by the writer thread); otherwise it stays for other processes and
        the byte budget (a split, a trim, a subtree under an unreadable node)."""
        ref = node.disk_ref
        if not isinstance(ref, DiskRef):
            return
        with self._changed:
            self._pending.pop(ref.name, None)
            if self._unlink and self.enabled:
                self._enqueue(_Op(ref.name, None))

    @contextmanager
    def removing(self) -> Iterator[None]:
        """Within this block, `delete` unlinks files (what invalidate and clear mean)."""
        self._unlink = True
        try:
            yield
        finally:
            self._unlink = False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write and unlink is on disk (fsynced); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout)

    # -- the writer thread --------------------------------------------------------------------
    def _enqueue(self, op: _Op) -> None:
        # Under self._changed.
        self._queue.append(op)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="ragcache-disk-writer", daemon=True
            )
            self._thread.start()
        self._changed.notify_all()

    def _run(self) -> None:
        renamed = False
        while True:
            with self._changed:
                while not self._queue:
                    self._busy = False
                    self._changed.notify_all()
                    if not self._changed.wait(IDLE_EXIT_S) and not self._queue:
                        self._thread = None
                        return
                op = self._queue.popleft()
                self._busy = True
                current = op.data is None or self._pending.get(op.name) is op.data
            try:
                if current:
                    renamed |= self._apply(op)
                with self._changed:
                    last = not self._queue
                if renamed and last:
                    self._after_batch()
                    renamed = False
            except OSError as exc:
                self._turn_off(f"cannot write {self.folder / op.name}: {exc}")
            except Exception:  # a bug must not leave flush() waiting forever
                log.exception("KV disk writer failed")
                self._turn_off("the disk writer failed (see the traceback above)")
            finally:
                with self._changed:
                    if op.data is not None and self.enabled:
                        self._pending_bytes -= len(op.data)
                        if self._pending.get(op.name) is op.data:
                            del self._pending[op.name]
                    self._changed.notify_all()

    def _apply(self, op: _Op) -> bool:
        """Write (temp, fsync, rename under the shared lock) or unlink one file; True if renamed."""
        path = self.folder / op.name
        if op.data is None:
            path.unlink(missing_ok=True)
            return False
        tmp = self.folder / f".{op.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "xb") as fh:
                fh.write(op.data)
                fh.flush()
                os.fsync(fh.fileno())
            with self._flock(exclusive=False):
                os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._approx_bytes += len(op.data)
        return True

    def _after_batch(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)  # so the renames themselves survive a crash
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        stale = time.monotonic() - self._last_scan > SCAN_EVERY_S
        if self._approx_bytes > self.budget_bytes or stale:
            self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Under the exclusive lock: unlink the least recently used files until the folder is
        within budget, and crashed writers' temporary files. Tolerates files others removed."""
        with self._flock(exclusive=True):
            files: list[tuple[int, str, int]] = []
            now = time.time()
            with os.scandir(self.folder) as listing:
                for item in listing:
                    try:
                        st = item.stat()
                        if item.name.endswith(SUFFIX):
                            files.append((st.st_mtime_ns, item.name, st.st_size))
                        elif item.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                            os.unlink(item.path)
                    except FileNotFoundError:
                        continue
            total = sum(size for _, _, size in files)
            for _, name, size in sorted(files):
                if total <= self.budget_bytes:
                    break
                try:
                    os.unlink(self.folder / name)
                    self.evicted += 1
                except FileNotFoundError:
                    pass
                total -= size
        self._approx_bytes, self._last_scan = total, time.monotonic()

    def _drop_if_unchanged(self, path: Path, fh: IO[bytes], why: CorruptEntry) -> bool:
        """Unlink `path` if it is still the file open as `fh` (whose bytes failed); log it.
        False when another process has replaced it meanwhile (read it again)."""
        mine = os.fstat(fh.fileno())
        with self._flock(exclusive=True):
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return True
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                return False
            path.unlink(missing_ok=True)
        log.warning("KV disk file %s is corrupt or truncated (%s); dropped", path.name, why)
        self.errors += 1
        return True


@atexit.register
def _drain_at_exit() -> None:
    # Spills still queued when the interpreter ends are worth keeping for the next process.
    for tier in list(_LIVE):
        tier.flush(EXIT_DRAIN_S)


__all__ = ["FORMAT_VERSION", "DiskEntry", "DiskRef", "DiskTier", "TierIdentity", "path_key"]
