"""Figures the cache reports: per lookup and global."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LookupStats:
    """Where one request's prompt came from."""

    prompt_tokens: int
    matched_tokens: int  # longest prefix found in the tree (either tier)
    start: int  # tokens restored: the deepest position every layer could resume from
    ram_tokens: int  # of `start`, restored from RAM
    disk_tokens: int  # of `start`, read back from the disk tier
    checkpoint_position: int | None  # the checkpoint used (models with snapshot layers), if any
    recomputed_tokens: int  # prompt_tokens - start - chunk_tokens
    chunk_tokens: int = 0  # copied from chunk entries (chunk reuse): approximate, not exact

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CacheStats:
    """The cache as a whole."""

    enabled: bool
    disk_enabled: bool
    policy: str
    budget_bytes: int
    ram_bytes: int
    ram_nodes: int
    peak_ram_bytes: int
    disk_bytes: int
    disk_nodes: int
    checkpoints: int
    lookups: int
    hits: int  # lookups that restored at least one token
    misses: int
    hit_tokens: int  # tokens restored, summed over lookups
    prompt_tokens: int  # tokens asked for, summed over lookups
    evictions: int
    spills: int  # evictions that went to the disk tier
    disk_reads: int
    disk_errors: int  # corrupt or unreadable files dropped
    invalidated: int
    chunk_lookups: int = 0  # prompts assembled with chunk reuse on
    chunk_tokens: int = 0  # tokens copied from chunk entries, summed
    chunk_entries: int = 0  # chunk entries stored

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "token_hit_rate": round(self.token_hit_rate, 4)}
