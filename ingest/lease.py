"""One writer per table on object storage: a lease held as a LanceDB table of its own.

A local store is locked with flock (`ingest.pipeline`): the kernel frees it when its holder
dies. Object stores have no such thing, so the lock is a tiny table `_<table>_lease` created
with mode="create": Lance commits a new table's first version with a conditional put, so of two
jobs racing to create it exactly one succeeds. The holder renews the lease's expiry from a
background thread; a job that finds a lease past its expiry (its holder was killed) takes it
over after reading it again, so only a lease that stayed expired is dropped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ragcache.store import StoreBusyError, StoreError


@dataclass(frozen=True)
class LeaseSettings:
    ttl_s: float = 120.0  # a killed holder's lease is taken over after this long
    renew_every_s: float = 30.0


def _lease_row(holder: str, ttl_s: float) -> pa.Table:
    now = time.time()
    return pa.table(
        {
            "holder": [holder],
            "host": [socket.gethostname()],
            "pid": [os.getpid()],
            "acquired_at": [now],
            "expires_at": [now + ttl_s],
        }
    )


def _read(db: Any, name: str) -> dict | None:
    try:
        rows = db.open_table(name).search().limit(1).to_arrow().to_pylist()
    except ValueError as exc:  # not found
        if "not found" in str(exc):
            return None
        raise
    return rows[0] if rows else None


def _try_create(db: Any, name: str, holder: str, ttl_s: float) -> bool:
    try:
        db.create_table(name, _lease_row(holder, ttl_s), mode="create")
        return True
    except (ValueError, OSError) as exc:  # "Table ... already exists", or a lost commit race
        if "exist" in str(exc).lower() or "conflict" in str(exc).lower():
            return False
        raise


def _acquire(db: Any, name: str, holder: str, table: str, where: str, ttl_s: float) -> None:
    """Create the lease table, or take over one whose holder let it expire."""
    if _try_create(db, name, holder, ttl_s):
        return
    current = _read(db, name)
    if current is not None and current["expires_at"] > time.time():
        raise StoreBusyError(
            f"another ingest job ({current['host']} pid {current['pid']}) is writing "
            f"table {table!r} in {where}",
            hint="retry when it has finished, or ingest into another --table",
        )
    # Expired (its holder died): look once more, then take it over.
    time.sleep(0.05)
    again = _read(db, name)
    if again is not None and again != current:
        raise StoreBusyError(
            f"another ingest job took the lease on table {table!r} in {where}",
            hint="retry when it has finished",
        )
    if again is not None:
        db.drop_table(name)
    if not _try_create(db, name, holder, ttl_s):
        raise StoreBusyError(
            f"another ingest job took the lease on table {table!r} in {where}",
            hint="retry when it has finished",
        )


@contextmanager
def table_lease(
    db: Any, table: str, where: str, settings: LeaseSettings | None = None
) -> Iterator[None]:
    """Hold the write lease on `table` for the duration of the block.

    Raises StoreBusyError when another job holds an unexpired lease, StoreError when the
    store cannot be reached (no bucket, no credentials).
    """
    s = settings or LeaseSettings()
    name = f"_{table}_lease"
    holder = uuid.uuid4().hex
    try:
        _acquire(db, name, holder, table, where, s.ttl_s)
    except StoreBusyError:
        raise
    except Exception as exc:  # no bucket, no credentials, no network: say where
        raise StoreError(f"cannot open the store at {where}: {exc}") from exc
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(s.renew_every_s):
            try:
                expires = time.time() + s.ttl_s
                db.open_table(name).update(
                    where=f"holder = '{holder}'", values={"expires_at": expires}
                )
            except Exception:  # a missed renewal only shortens the lease; the next one retries
                continue

    renewer = threading.Thread(target=renew, name="ingest-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)
        current = _read(db, name)
        if current is not None and current["holder"] == holder:
            db.drop_table(name)
