"""One disk-tier entry as a self-describing file, and the identity that names the tier's folder.

An entry file needs no index: a 28-byte prefix (magic b"RCKV", format version u32, header length
u32, header CRC32 u32, body length u64, body CRC32 u32, little-endian), a JSON header saying where
the node sits in the tree, and a body of safetensors bytes holding its arrays. A file is whole when
its size is the prefix plus both lengths and both CRCs match. The header alone (read at start) is
enough to rebuild the tree; the body is checked when it is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, cast

import mlx.core as mx

from ragcache.cache.tree import Node

FORMAT_VERSION = 3  # 3: one self-describing file per entry, no index.json; 2: window spans
MAGIC = b"RCKV"
PREFIX = struct.Struct("<4sIIIQI")
SUFFIX = ".kv"


class CorruptEntry(ValueError):
    """The bytes of an entry file are not a whole entry of this tier."""


def path_key(tokens: Sequence[int]) -> str:
    """A hash of a whole token path: stable when an ancestor node is split."""
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()[:32]


def entry_name(path: str, start: int, has_checkpoint: bool) -> str:
    # Start and checkpoint are in the name: two processes may cut the same path differently.
    return f"{path}-{start}{'c' if has_checkpoint else ''}{SUFFIX}"


@dataclass(frozen=True)
class DiskRef:
    """A node's handle on its file (`Node.disk_ref`): the name and the shape the file holds."""

    name: str
    start: int
    n_tokens: int
    has_checkpoint: bool


@dataclass(frozen=True)
class DiskEntry:
    """What an entry's header says: enough to hang the node back on the tree."""

    name: str
    path: str  # path_key of the tokens up to the node's end
    parent: str | None  # path_key of the tokens up to `start`; None at the root
    start: int
    tokens: list[int]
    n_bytes: int  # the node's RAM bytes
    has_checkpoint: bool
    file_bytes: int

    @property
    def ref(self) -> DiskRef:
        return DiskRef(self.name, self.start, len(self.tokens), self.has_checkpoint)


@dataclass(frozen=True)
class TierIdentity:
    """Everything that decides the bytes of a stored entry; another identity has another folder."""

    model: str  # LoadedModel.identity: weights, config, tokenizer
    kv_bits: int | None
    kv_group_size: int
    kv_dtypes: str  # dtypes of the stored arrays, e.g. "bfloat16" or "bfloat16,uint32"
    mlx_version: str
    mlx_lm_version: str

    @classmethod
    def current(
        cls, model: str, kv_bits: int | None, kv_group_size: int, kv_dtypes: str
    ) -> TierIdentity:
        """The identity under the installed mlx and mlx-lm."""
        return cls(model, kv_bits, kv_group_size, kv_dtypes, _version("mlx"), _version("mlx-lm"))

    @property
    def folder_name(self) -> str:
        group = self.kv_group_size if self.kv_bits else 0  # unquantized: the group size is unused
        what = [self.kv_bits, group, self.kv_dtypes, self.mlx_version, self.mlx_lm_version]
        digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]
        return f"{self.model}-{digest}-v{FORMAT_VERSION}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def array_dtypes(obj: Any) -> str:
    """The sorted dtype names of the arrays in a nested payload ("bfloat16", "float16,uint32")."""
    arrays: dict[str, mx.array] = {}
    _encode(obj, "n", arrays)
    return ",".join(sorted({_dtype_name(a.dtype) for a in arrays.values()}))


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _encode(obj: Any, name: str, arrays: dict[str, mx.array]) -> Any:
    """A JSON skeleton of a nested payload; its arrays go into `arrays` under path names."""
    if isinstance(obj, mx.array):
        arrays[name] = obj
        return {"a": name}
    if isinstance(obj, tuple | list):
        return {"t": [_encode(v, f"{name}.{i}", arrays) for i, v in enumerate(obj)]}
    if isinstance(obj, mx.Dtype):
        return {"d": _dtype_name(obj)}
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


def encode_entry(node: Node, identity: str) -> tuple[DiskEntry, bytes]:
    """The file bytes of a node's payload and checkpoint. Runs MLX (a copy of evaluated arrays)."""
    tokens = [t for n in node.path() for t in n.tokens]
    arrays: dict[str, mx.array] = {}
    skeleton = _encode((node.payload, node.checkpoint), "n", arrays)
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, arrays)
    body = buffer.getvalue()
    path = path_key(tokens)
    parent = path_key(tokens[: node.start]) if node.start else None
    head = {
        "version": FORMAT_VERSION,
        "identity": identity,
        "path": path,
        "parent": parent,
        "start": node.start,
        "tokens": list(node.tokens),
        "n_bytes": node.n_bytes,
        "has_checkpoint": node.has_checkpoint,
        "skeleton": skeleton,
    }
    header = json.dumps(head, separators=(",", ":")).encode()
    prefix = PREFIX.pack(
        MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header), len(body), zlib.crc32(body)
    )
    name = entry_name(path, node.start, node.has_checkpoint)
    size = PREFIX.size + len(header) + len(body)
    entry = DiskEntry(
        name, path, parent, node.start, list(node.tokens), node.n_bytes, node.has_checkpoint, size
    )
    return entry, prefix + header + body


def header_length(prefix: bytes) -> int:
    """Bytes of the header after a file's first PREFIX.size bytes. Raises CorruptEntry."""
    if len(prefix) < PREFIX.size:
        raise CorruptEntry(f"truncated: {len(prefix)} bytes, shorter than the prefix")
    magic, version, header_len, *_ = PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptEntry("not an entry file of this format version")
    return int(header_len)


def decode_header(head: bytes, file_bytes: int, name: str, identity: str) -> tuple[DiskEntry, Any]:
    """(entry, skeleton) from a file's first bytes (prefix and header) and its size.

    Raises CorruptEntry when the file is truncated, of another tier, or its header is damaged."""
    header_len = header_length(head)
    _, _, _, header_crc, body_len, _ = PREFIX.unpack_from(head)
    header = head[PREFIX.size : PREFIX.size + header_len]
    if file_bytes != PREFIX.size + header_len + body_len:
        raise CorruptEntry(
            f"truncated: {file_bytes} bytes, not {PREFIX.size + header_len + body_len}"
        )
    if len(header) != header_len or zlib.crc32(header) != header_crc:
        raise CorruptEntry("header checksum differs")
    try:
        raw = json.loads(header)
        entry = DiskEntry(
            name,
            str(raw["path"]),
            raw["parent"],
            int(raw["start"]),
            [int(t) for t in raw["tokens"]],
            int(raw["n_bytes"]),
            bool(raw["has_checkpoint"]),
            file_bytes,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"header unreadable: {exc}") from exc
    if raw.get("identity") != identity:
        raise CorruptEntry("an entry of another tier identity")
    if entry_name(entry.path, entry.start, entry.has_checkpoint) != name:
        raise CorruptEntry("header does not match the file name")
    return entry, raw["skeleton"]


def decode_entry(data: bytes, name: str, identity: str) -> tuple[DiskEntry, Any, Any]:
    """(entry, payload, checkpoint) from a whole file's bytes. Raises CorruptEntry."""
    entry, skeleton = decode_header(data, len(data), name, identity)
    body = data[PREFIX.size + header_length(data) :]
    if zlib.crc32(body) != PREFIX.unpack_from(data)[5]:
        raise CorruptEntry("body checksum differs")
    try:
        loaded = mx.load(io.BytesIO(body), format="safetensors")
        payload, checkpoint = _decode(skeleton, cast(dict[str, mx.array], loaded))
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"body unreadable: {exc}") from exc
    return entry, payload, checkpoint
