"""Settings of the prefix cache: one frozen dataclass with defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ragcache.cache.eviction import POLICIES
from ragcache.errors import ConfigError

GIB = 1 << 30


def available_memory_bytes() -> int:
    """Memory the OS could hand out now (MemAvailable on Linux, physical pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 8 * GIB


def default_cache_bytes() -> int:
    # A quarter of free memory: the model, activations and the rest of the service need the rest.
    return max(0, available_memory_bytes() // 4)


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    # RAM budget of stored KV and checkpoints, enforced on every insert. None: a quarter of the
    # memory free when the cache is made, which is after the model is loaded (`resolved`): a
    # budget read before loading would count the model's own weights as free.
    cache_bytes: int | None = None
    policy: str = "pgdsf"  # a key of ragcache.cache.eviction.POLICIES
    # Models with snapshot layers (recurrent state): a checkpoint every N tokens inside long
    # segments, besides segment boundaries (0: boundaries only). Models whose layers are all span
    # kinds (Gemma 3, Llama): a capture at least every N tokens (and every sliding window).
    checkpoint_every_tokens: int = 512
    # Keep the generated continuation too, so a multi-turn chat extends its own path.
    store_generated: bool = True
    kv_bits: int | None = None  # None: stored as computed; 8 or 4: mx.quantize'd
    kv_group_size: int = 64
    # Chunk reuse (ragcache.cache.chunk_kv, opt-in per request): tokens of each reused chunk
    # computed in the new prompt before its stored K/V is copied, and the shortest chunk worth
    # copying. Chosen by benchmarks/chunk_reuse.py.
    chunk_recompute_tokens: int = 8
    chunk_min_tokens: int = 24
    disk_dir: Path | None = None  # None: no disk tier
    disk_bytes: int = 16 * GIB

    def resolved(self) -> CacheSettings:
        """These settings with `cache_bytes` fixed: the default measured now."""
        if self.cache_bytes is not None:
            return self
        return replace(self, cache_bytes=default_cache_bytes())

    @property
    def budget_bytes(self) -> int:
        """The RAM budget; the default measured now if `resolved` was never called."""
        return self.cache_bytes if self.cache_bytes is not None else default_cache_bytes()

    def validate(self) -> CacheSettings:
        """Raise ConfigError on values the cache cannot use; return self."""
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ConfigError(f"cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown cache policy {self.policy!r}", hint="one of: " + ", ".join(POLICIES)
            )
        if self.kv_bits not in (None, 4, 8):
            raise ConfigError(f"kv_bits must be 4, 8 or unset, got {self.kv_bits!r}")
        if self.kv_group_size not in (32, 64, 128):
            raise ConfigError(f"kv_group_size must be 32, 64 or 128, got {self.kv_group_size}")
        if self.checkpoint_every_tokens < 0:
            raise ConfigError("checkpoint_every_tokens must be >= 0 (0: boundaries only)")
        if self.chunk_recompute_tokens < 0 or self.chunk_min_tokens < 1:
            raise ConfigError("chunk_recompute_tokens must be >= 0 and chunk_min_tokens >= 1")
        if self.disk_bytes < 0:
            raise ConfigError("disk_bytes must be >= 0")
        return self
