"""The disk tier shared by several processes: real processes, real files, real locks."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.cache.disk import DiskTier, TierIdentity
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from tests.cache.shared_tier_worker import (
    IDENTITY,
    N_KEYS,
    check,
    hammer,
    stored_node,
    tokens_of,
    written_node,
)

BIG = 1 << 30
ENTRY_BYTES = 1500  # about one entry file of the worker's payloads
TIGHT = 3 * ENTRY_BYTES


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict]]]:
    """Three real processes (spawned), each hammering a roomy tier and then a tight one."""
    root = tmp_path_factory.mktemp("shared")
    phases = [(root / "roomy", BIG), (root / "tight", TIGHT)]
    for folder, _ in phases:
        folder.mkdir()
    n = 3
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n) as pool:
        args = [([(str(f), b) for f, b in phases], w, n, 150) for w in range(n)]
        per_writer = pool.starmap(hammer, args)
    return {
        name: (folder, [runs[i] for runs in per_writer])
        for i, (name, (folder, _)) in enumerate(zip(("roomy", "tight"), phases, strict=True))
    }


def test_processes_sharing_a_tier_lose_nothing_and_read_exact_bytes(
    shared_runs: dict[str, tuple[Path, list[dict]]],
) -> None:
    folder, results = shared_runs["roomy"]
    for r in results:
        assert r["enabled"] and r["errors"] == 0 and not r["warnings"], r
        assert not r["bad"] and r["misses_after_write"] == 0, r
        assert r["reads"] > 0
    written = set().union(*(r["written"] for r in results))
    assert len(written) == N_KEYS  # every key was written, most by more than one process
    tier = DiskTier(folder, IDENTITY, BIG)
    assert tier.count_entries() == len(written)
    for key in written:
        got = tier.read(stored_node(key))
        assert got is not None and check(key, got) is None
    assert tier.errors == 0


def test_processes_evicting_under_a_small_budget_never_serve_wrong_bytes(
    shared_runs: dict[str, tuple[Path, list[dict]]],
) -> None:
    folder, results = shared_runs["tight"]
    for r in results:  # misses are expected here; wrong bytes or "corrupt" never
        assert r["enabled"] and r["errors"] == 0 and not r["warnings"], r
        assert not r["bad"], r
    assert sum(r["evicted"] for r in results) > 0
    tier = DiskTier(folder, IDENTITY, TIGHT)
    tier.write(written_node(0, 9, 0))
    tier.flush()  # its first batch looks at the whole folder and evicts the oldest
    assert sum(f.stat().st_size for f in tier.folder.glob("*.kv")) <= TIGHT
    assert tier.errors == 0 and tier.read(stored_node(0)) is not None


GREEDY = SamplingParams(max_tokens=8)
PROMPT = SegmentedPrompt(list(range(10, 110)), [30, 60, 100])
OTHER = SegmentedPrompt(list(range(200, 300)), [50, 100])


def cache_at(loaded: LoadedModel, folder: Path, **kw: Any) -> PrefixCache:
    return PrefixCache(
        loaded, CacheSettings(cache_bytes=kw.pop("cache_bytes", BIG), disk_dir=folder, **kw)
    )


def test_a_starting_cache_keeps_a_running_ones_spills(
    tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    # `ragcache ask` starting beside a running `ragcache serve` on one home.
    probe = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=BIG))
    serve = cache_at(tiny_gemma, tmp_path, cache_bytes=probe.min_node_bytes * 60)
    engine = Engine(tiny_gemma, cache=serve)
    engine.generate(PROMPT, GREEDY)
    engine.generate(OTHER, GREEDY)  # PROMPT's nodes spill to disk
    assert serve.disk is not None and serve.disk.flush()
    spilled = set(serve.disk.folder.glob("*.kv"))
    assert serve.stats().spills > 0 and spilled
    ask = cache_at(tiny_gemma, tmp_path)
    Engine(tiny_gemma, cache=ask).generate(OTHER, GREEDY)
    ask.flush()  # writes keys the serving cache holds too
    assert spilled <= set(serve.disk.folder.glob("*.kv"))
    out = engine.generate(PROMPT, GREEDY)
    assert out.lookup.disk_tokens > 0 and serve.stats().disk_errors == 0
    assert out.tokens == Engine(tiny_gemma).generate(PROMPT, GREEDY).tokens


def test_a_starting_cache_deletes_no_orphans_or_temporary_files(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    first = cache_at(tiny_llama, tmp_path)
    Engine(tiny_llama, cache=first).generate(PROMPT, GREEDY)
    first.flush()
    assert first.disk is not None
    folder = first.disk.folder
    roots = [f for f in folder.glob("*.kv") if f.stem.endswith(("-0", "-0c"))]
    for f in roots:  # what is left hangs under a parent only the other process holds
        f.unlink()
    in_progress = folder / ".abc-0.kv.99999.deadbeef.tmp"
    in_progress.write_bytes(b"half an entry")
    before = sorted(folder.iterdir())
    second = cache_at(tiny_llama, tmp_path)
    assert second.stats().disk_nodes == 0  # nothing reachable from here ...
    assert sorted(folder.iterdir()) == before  # ... and nothing deleted


def test_torn_or_truncated_files_are_dropped_logged_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(tmp_path, IDENTITY, BIG)
    for key in (0, 1):
        tier.write(written_node(key, 0, 0))
    tier.flush()
    torn = tier.folder / stored_node(0).disk_ref.name  # torn at start: found by the header scan
    torn.write_bytes(torn.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING):
        fresh = DiskTier(tmp_path, IDENTITY, BIG)
        assert [e.tokens for e in fresh.entries()] == [tokens_of(1)]
    assert not torn.exists() and fresh.errors == 1 and "truncated" in caplog.text
    late = tier.folder / stored_node(1).disk_ref.name  # torn after start: found when read
    late.write_bytes(late.read_bytes()[:40])
    assert fresh.read(stored_node(1)) is None
    assert not late.exists() and fresh.errors == 2
    assert fresh.read(stored_node(0)) is None and fresh.errors == 2  # gone is a miss, not an error


def test_identity_folder_changes_with_what_changes_kv_bytes() -> None:
    base = TierIdentity("model", None, 64, "bfloat16", "0.32.4", "0.32.2")
    variants = [
        replace(base, model="other-model"),
        replace(base, kv_bits=8),
        replace(base, kv_bits=4),
        replace(base, kv_dtypes="float16"),
        replace(base, mlx_version="0.33.0"),
        replace(base, mlx_lm_version="0.33.0"),
    ]
    assert len({v.folder_name for v in [base, *variants]}) == len(variants) + 1
    assert replace(base, kv_group_size=32).folder_name == base.folder_name  # unused unquantized
    quantized = replace(base, kv_bits=8)
    assert replace(quantized, kv_group_size=32).folder_name != quantized.folder_name
    now = TierIdentity.current("model", None, 64, "bfloat16")
    assert (now.mlx_version, now.mlx_lm_version) == (
        metadata.version("mlx"),
        metadata.version("mlx-lm"),
    )


def test_quantized_cache_does_not_open_unquantized_entries(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    plain = cache_at(tiny_llama, tmp_path)
    Engine(tiny_llama, cache=plain).generate(PROMPT, GREEDY)
    plain.flush()
    quantized = cache_at(tiny_llama, tmp_path, kv_bits=8)
    assert plain.disk is not None and quantized.disk is not None
    assert quantized.disk.folder != plain.disk.folder
    assert quantized.stats().disk_nodes == 0 and cache_at(tiny_llama, tmp_path).stats().disk_nodes


@contextmanager
def held_lock(folder: Path) -> Iterator[None]:
    """The tier's lock held exclusively, as another process evicting would hold it."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_queued_write_is_read_from_memory_never_half_written(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, IDENTITY, BIG)
    with held_lock(tier.folder):  # the writer thread cannot rename its file yet
        assert tier.write(written_node(3, 0, 1))
        assert not tier.flush(timeout=0.3)
        assert not list(tier.folder.glob("*.kv"))
        got = tier.read(stored_node(3))
        assert got is not None and check(3, got) is None
    assert tier.flush(timeout=30)
    assert tier.count_entries() == 1 and tier.reads == 0  # served from memory, not a file
    got = tier.read(stored_node(3))
    assert got is not None and check(3, got) is None and tier.reads == 1


def test_budget_evicts_least_recently_used_across_tiers(tmp_path: Path) -> None:
    one = DiskTier(tmp_path, IDENTITY, BIG)
    for key in range(4):
        one.write(written_node(key, 0, 0))
        one.flush()
        time.sleep(0.03)  # distinct mtimes
    size = max(f.stat().st_size for f in one.folder.glob("*.kv"))
    two = DiskTier(tmp_path, IDENTITY, int(4.5 * size))
    assert two.read(stored_node(0)) is not None  # a read makes key 0 recent
    time.sleep(0.03)
    for key in (4, 5):
        two.write(written_node(key, 1, 0))
    two.flush()
    kept = {e.tokens[0] - 1000 for e in two.entries()}
    assert kept == {0, 3, 4, 5} and two.count_entries() == 4 and two.evicted == 2
    assert one.read(stored_node(1)) is None and one.errors == 0  # gone: a miss, not corruption


def test_clear_unlinks_the_files_of_its_nodes(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    cache = cache_at(tiny_llama, tmp_path)
    Engine(tiny_llama, cache=cache).generate(PROMPT, GREEDY)
    cache.flush()
    assert cache.disk is not None and cache.disk.count_entries() > 0
    cache.clear()
    assert cache.disk.count_entries() == 0
