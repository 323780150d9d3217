"""Where a chunk store lives: a local folder, or any object store LanceDB can write to.

`--db` takes either. A URI (`s3://bucket/prefix`, `gs://...`, `az://...`) is handed to LanceDB
as is; credentials and endpoints come from that cloud's usual environment (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and for an S3-compatible server
`AWS_ENDPOINT` with `AWS_ALLOW_HTTP=true`), which LanceDB's object store reads itself. The side
state an ingest job keeps (its lock and its removal journal) lives in the store too, so nothing
depends on a local disk the next job may not share.
"""

from __future__ import annotations

import re
from pathlib import Path

StoreLocation = str | Path  # a local folder, or a URI with a scheme

_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.+)$")
OBJECT_STORE_SCHEMES = ("s3", "s3+ddb", "gs", "az", "abfs", "memory")


def is_remote(db: StoreLocation) -> bool:
    """Whether `db` names an object store (a URI) rather than a local folder."""
    match = _URI.match(str(db))
    return match is not None and match.group("scheme") != "file"


def normalise(db: StoreLocation) -> StoreLocation:
    """A URI stays a string (`file://` becomes its path); anything else is a local Path.

    Raises ValueError for a URI scheme LanceDB cannot store into, so a typo fails before any
    work is done instead of writing a folder named `s4:`.
    """
    text = str(db)
    match = _URI.match(text)
    if match is None:
        return Path(db)
    scheme = match.group("scheme")
    if scheme == "file":
        return Path(match.group("rest"))
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(
            f"unknown store scheme {scheme!r} in {text!r}: use a folder or one of "
            + ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES)
        )
    return text.rstrip("/")
