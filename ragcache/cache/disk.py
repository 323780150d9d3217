"""The disk tier: evicted nodes as safetensors files, with an index that survives restarts.

Layout: `<disk_dir>/<model identity>-v<FORMAT_VERSION>/<key>.safetensors` plus `index.json` there.
A node's key hashes its whole token path, so it is stable when an ancestor is split. Another model
or format version has another folder name and is never opened. Every file's size and CRC32 are in
the index and checked before it is parsed: a truncated or corrupt file is dropped, logged, never
served. Any write error (unwritable folder, disk full) turns the tier off with one clear message;
RAM is untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from ragcache.cache.tree import Node

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: sliding-window layers stored as spans, not window snapshots


def path_key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()[:32]


def node_tokens(node: Node) -> list[int]:
    return [t for n in node.path() for t in n.tokens]


def _encode(obj: Any, name: str, arrays: dict[str, mx.array]) -> Any:
    """A JSON skeleton of a nested payload; its arrays go into `arrays` under path names."""
    if isinstance(obj, mx.array):
        arrays[name] = obj
        return {"a": name}
    if isinstance(obj, tuple | list):
        return {"t": [_encode(v, f"{name}.{i}", arrays) for i, v in enumerate(obj)]}
    if isinstance(obj, mx.Dtype):
        return {"d": str(obj).rsplit(".", 1)[-1]}
    return obj  # None, int, float, str


def _decode(skeleton: Any, arrays: dict[str, mx.array]) -> Any:
    if isinstance(skeleton, dict):
        if "a" in skeleton:
            return arrays[skeleton["a"]]
        if "t" in skeleton:
            return tuple(_decode(v, arrays) for v in skeleton["t"])
        if "d" in skeleton:
            return getattr(mx, skeleton["d"])
    return skeleton


@dataclass
class IndexEntry:
    key: str
    parent: str | None  # key of the path up to `start`; None at the root
    start: int
    tokens: list[int]
    n_bytes: int
    has_checkpoint: bool
    file_bytes: int
    crc32: int


class DiskTier:
    """Implements the tree's LowerTier on a folder. Not thread-safe (the cache's lock covers it)."""

    def __init__(self, root: Path, identity: str, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.folder = Path(root).expanduser() / f"{identity}-v{FORMAT_VERSION}"
        self.identity = identity
        self.entries: dict[str, IndexEntry] = {}
        self.enabled = True
        self.reads = self.errors = 0
        self.read_bps = 0.0  # measured; 0 until the first read
        self._dirty = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            self._turn_off(f"cannot write to {self.folder}: {exc}")
            return
        self._load_index()

    def _turn_off(self, why: str) -> None:
        if self.enabled:
            log.error("KV disk tier off: %s. The RAM cache keeps working.", why)
        self.enabled = False

    # -- index --------------------------------------------------------------------------------
    def _load_index(self) -> None:
        path = self.folder / "index.json"
        try:
            raw = json.loads(path.read_text()) if path.exists() else {}
            if raw and (
                raw.get("version") != FORMAT_VERSION or raw.get("identity") != self.identity
            ):
                raise ValueError("index of another model or format version")
            entries = [IndexEntry(**e) for e in raw.get("entries", [])]
        except (OSError, ValueError, TypeError) as exc:
            log.warning("KV disk index %s unreadable (%s); starting the disk tier empty", path, exc)
            entries = []
        for entry in entries:
            file = self.folder / f"{entry.key}.safetensors"
            if file.exists() and file.stat().st_size == entry.file_bytes:
                self.entries[entry.key] = entry
            else:
                log.warning("KV disk file %s missing or truncated; dropped", file.name)
                file.unlink(missing_ok=True)
                self._dirty = True
        known = {f"{k}.safetensors" for k in self.entries}
        for file in self.folder.glob("*.safetensors"):
            if file.name not in known:  # written but never indexed (a crash between the two)
                file.unlink(missing_ok=True)

    def index(self) -> list[IndexEntry]:
        """Entries ordered parents first (by start), for rebuilding the tree after a restart."""
        return sorted(self.entries.values(), key=lambda e: e.start)

    def save_index(self) -> None:
        """Write index.json atomically if anything changed."""
        if not self.enabled or not self._dirty:
            return
        body = {
            "version": FORMAT_VERSION,
            "identity": self.identity,
            "entries": [vars(e) for e in self.entries.values()],
        }
        tmp = self.folder / "index.json.tmp"
        try:
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.folder / "index.json")
            self._dirty = False
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._turn_off(f"cannot write the index in {self.folder}: {exc}")

    # -- LowerTier ----------------------------------------------------------------------------
    def write(self, node: Node) -> bool:
        """Store the node's payload and checkpoint; False (and maybe the tier off) on failure."""
        if not self.enabled:
            return False
        tokens = node_tokens(node)
        key = path_key(tokens)
        arrays: dict[str, mx.array] = {}
        skeleton = _encode((node.payload, node.checkpoint), "n", arrays)
        buffer = io.BytesIO()
        meta = {"skeleton": json.dumps(skeleton), "identity": self.identity}
        mx.save_safetensors(buffer, arrays, metadata=meta)
        data = buffer.getvalue()
        file = self.folder / f"{key}.safetensors"
        tmp = file.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._turn_off(f"cannot write {file}: {exc}")
            return False
        parent = path_key(tokens[: node.start]) if node.start else None
        self.entries[key] = IndexEntry(
            key,
            parent,
            node.start,
            list(node.tokens),
            node.n_bytes,
            node.has_checkpoint,
            len(data),
            zlib.crc32(data),
        )
        node.disk_ref = key
        self._dirty = True
        return True

    def read(self, node: Node) -> tuple[Any, Any] | None:
        """The node's (payload, checkpoint), or None if its file is gone, truncated or corrupt."""
        entry = self.entries.get(node.disk_ref) if node.disk_ref else None
        if entry is None:
            return None
        file = self.folder / f"{entry.key}.safetensors"
        began = time.perf_counter()
        try:
            data = file.read_bytes()
            if len(data) != entry.file_bytes or zlib.crc32(data) != entry.crc32:
                raise ValueError("size or checksum differs from the index")
            loaded = mx.load(io.BytesIO(data), format="safetensors", return_metadata=True)
            arrays, meta = cast(tuple[dict[str, mx.array], dict[str, str]], loaded)
            payload, checkpoint = _decode(json.loads(meta["skeleton"]), arrays)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("KV disk file %s is corrupt or unreadable (%s); dropped", file.name, exc)
            self.errors += 1
            self.delete(node)
            return None
        elapsed = max(time.perf_counter() - began, 1e-6)
        rate = len(data) / elapsed
        self.read_bps = rate if not self.read_bps else 0.7 * self.read_bps + 0.3 * rate
        self.reads += 1
        return payload, checkpoint

    def delete(self, node: Node) -> None:
        key = node.disk_ref
        if key is None or self.entries.pop(key, None) is None:
            return
        self._dirty = True
        try:
            (self.folder / f"{key}.safetensors").unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete KV disk file %s: %s", key, exc)
