"""Prefix-aware KV cache: a radix tree of token spans with checkpoints, eviction and a disk tier."""

from ragcache.cache.prefix_cache import PrefixCache
from ragcache.cache.session import CacheSession, capture_positions
from ragcache.cache.settings import CacheSettings
from ragcache.cache.stats import CacheStats, LookupStats

__all__ = [
    "CacheSession",
    "CacheSettings",
    "CacheStats",
    "LookupStats",
    "PrefixCache",
    "capture_positions",
]
