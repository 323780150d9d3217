"""What one process does to a shared disk tier in tests: small imports, so spawning is cheap.

Entries are real tree nodes holding small random MLX payloads that name their own origin (key,
writer, round), so any read can be checked byte for byte against what some process wrote.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ragcache.cache.disk import DiskTier, TierIdentity
from ragcache.cache.disk_file import DiskRef, entry_name, path_key
from ragcache.cache.tree import Node

IDENTITY = TierIdentity("test-model", None, 64, "float32,int32", "mlx-test", "mlx-lm-test")
N_KEYS = 6


def tokens_of(key: int) -> list[int]:
    return [1000 + key, 7, 7, 2000 + key]


def payload_of(key: int, writer: int, round_: int) -> tuple[mx.array, mx.array]:
    seed = key * 1_000_000 + writer * 10_000 + round_
    values = mx.random.normal((16, 4 + round_ % 5), key=mx.random.key(seed))
    return mx.array([key, writer, round_], dtype=mx.int32), values


def written_node(key: int, writer: int, round_: int) -> Node:
    payload = payload_of(key, writer, round_)
    mx.eval(payload)
    node = Node(tokens_of(key), 0, Node([], 0, None), payload=payload)
    node.n_bytes = sum(a.nbytes for a in payload)
    return node


def stored_node(key: int) -> Node:
    """A disk-only node for `key`, as a process that found its file would hold it."""
    tokens = tokens_of(key)
    ref = DiskRef(entry_name(path_key(tokens), 0, False), 0, len(tokens), False)
    return Node(tokens, 0, Node([], 0, None), in_ram=False, on_disk=True, disk_ref=ref)


def check(key: int, got: tuple[Any, Any]) -> str | None:
    """None when `got` is exactly what some writer wrote for `key`; else what is wrong."""
    (origin, values), checkpoint = got
    k, writer, round_ = (int(v) for v in origin.tolist())
    if k != key or checkpoint is not None:
        return f"key {key}: read an entry of key {k}"
    expected = payload_of(k, writer, round_)[1]
    if np.asarray(values).tobytes() != np.asarray(expected).tobytes():
        return f"key {key}: bytes differ from writer {writer}'s round {round_}"
    return None


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def hammer(phases: list[tuple[str, int]], writer: int, n_writers: int, rounds: int) -> list[dict]:
    """For each (folder, budget): write and read overlapping keys at random; report bad reads."""
    return [_hammer(Path(f), budget, writer, n_writers, rounds) for f, budget in phases]


def _hammer(folder: Path, budget: int, writer: int, n_writers: int, rounds: int) -> dict:
    warnings = _Warnings()
    logging.getLogger("ragcache.cache.disk").addHandler(warnings)
    (folder / f"ready-{writer}").touch()  # all processes start together
    deadline = time.monotonic() + 120
    while len(list(folder.glob("ready-*"))) < n_writers and time.monotonic() < deadline:
        time.sleep(0.01)
    tier = DiskTier(folder, IDENTITY, budget, max_pending_bytes=8 << 10)
    rng = random.Random(writer)
    written: set[int] = set()
    bad: list[str] = []
    misses_after_write = reads = 0
    for round_ in range(rounds):
        key = rng.randrange(N_KEYS)
        if rng.random() < 0.5:
            assert tier.write(written_node(key, writer, round_))
            written.add(key)
            continue
        got = tier.read(stored_node(key))
        reads += got is not None
        if got is None:
            misses_after_write += key in written
        elif (problem := check(key, got)) is not None:
            bad.append(problem)
    tier.flush()
    logging.getLogger("ragcache.cache.disk").removeHandler(warnings)
    return {
        "written": sorted(written),
        "reads": reads,
        "bad": bad,
        "misses_after_write": misses_after_write,
        "errors": tier.errors,
        "evicted": tier.evicted,
        "enabled": tier.enabled,
        "warnings": warnings.messages,
    }
