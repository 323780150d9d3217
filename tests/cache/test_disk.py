"""The disk tier: spills, a warm restart, corrupt files, other models' folders, write failures."""

from __future__ import annotations

import logging
import resource
import signal
from pathlib import Path

import pytest

from ragcache.cache import CacheSettings, PrefixCache
from ragcache.cache.disk import FORMAT_VERSION
from ragcache.engine import Engine
from ragcache.model_loader import LoadedModel
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt

GREEDY = SamplingParams(max_tokens=8)
PROMPT = SegmentedPrompt(list(range(10, 110)), [30, 60, 100])


def cache_at(loaded: LoadedModel, folder: Path, **kw) -> PrefixCache:
    settings = CacheSettings(cache_bytes=kw.pop("cache_bytes", 1 << 30), disk_dir=folder, **kw)
    return PrefixCache(loaded, settings)


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.kv"))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma"])
def test_restart_starts_warm_and_exact(model: str, request, tmp_path: Path) -> None:
    loaded = request.getfixturevalue(model)
    expected = Engine(loaded).generate(PROMPT, GREEDY).tokens
    first = cache_at(loaded, tmp_path)
    Engine(loaded, cache=first).generate(PROMPT, GREEDY)
    first.flush()
    assert files(tmp_path)
    restarted = cache_at(loaded, tmp_path)  # a new process would see just the folder
    assert restarted.stats().disk_nodes > 0 and restarted.stats().ram_nodes == 0
    out = Engine(loaded, cache=restarted).generate(PROMPT, GREEDY)
    assert out.tokens == expected
    assert out.lookup.disk_tokens > 0 and out.lookup.disk_tokens == out.stats.cached_tokens
    assert restarted.stats().disk_reads > 0


def test_evicted_nodes_spill_and_come_back(tiny_gemma: LoadedModel, tmp_path: Path) -> None:
    probe = PrefixCache(tiny_gemma, CacheSettings(cache_bytes=1 << 30))
    cache = cache_at(tiny_gemma, tmp_path, cache_bytes=probe.min_node_bytes * 60)
    engine = Engine(tiny_gemma, cache=cache)
    other = SegmentedPrompt(list(range(200, 300)), [50, 100])
    engine.generate(PROMPT, GREEDY)
    engine.generate(other, GREEDY)  # pushes PROMPT's nodes out of RAM
    stats = cache.stats()
    assert stats.spills > 0 and stats.disk_nodes > 0 and stats.peak_ram_bytes <= stats.budget_bytes
    out = engine.generate(PROMPT, GREEDY)
    assert out.lookup.disk_tokens > 0
    assert out.tokens == Engine(tiny_gemma).generate(PROMPT, GREEDY).tokens


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_dropped_logged_never_served(
    tiny_llama: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = cache_at(tiny_llama, tmp_path)
    Engine(tiny_llama, cache=first).generate(PROMPT, GREEDY)
    first.flush()
    for file in files(tmp_path):
        data = bytearray(file.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[-5] ^= 0xFF  # same size, different bytes: only the checksum sees it
        file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        restarted = cache_at(tiny_llama, tmp_path)
        out = Engine(tiny_llama, cache=restarted).generate(PROMPT, GREEDY)
    assert out.stats.cached_tokens == 0
    assert out.tokens == Engine(tiny_llama).generate(PROMPT, GREEDY).tokens
    assert "truncated" in caplog.text or "corrupt" in caplog.text


def test_other_model_or_version_folder_is_not_read(
    tiny_llama: LoadedModel, tiny_gemma: LoadedModel, tmp_path: Path
) -> None:
    llama_cache = cache_at(tiny_llama, tmp_path)
    Engine(tiny_llama, cache=llama_cache).generate(PROMPT, GREEDY)
    llama_cache.flush()
    gemma_cache = cache_at(tiny_gemma, tmp_path)
    assert gemma_cache.stats().disk_nodes == 0
    assert llama_cache.disk is not None and llama_cache.disk.folder.name.endswith(
        f"-v{FORMAT_VERSION}"
    )
    old = llama_cache.disk.folder
    old.rename(old.with_name(old.name.removesuffix(f"{FORMAT_VERSION}") + f"{FORMAT_VERSION - 1}"))
    assert cache_at(tiny_llama, tmp_path).stats().disk_nodes == 0


def test_unwritable_folder_turns_tier_off(
    tiny_llama: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        cache = cache_at(tiny_llama, blocker / "kv")
    assert "disk tier off" in caplog.text and not cache.stats().disk_enabled
    engine = Engine(tiny_llama, cache=cache)
    engine.generate(PROMPT, GREEDY)
    assert engine.generate(PROMPT, GREEDY).stats.cached_tokens > 0  # RAM still works


def test_full_disk_turns_tier_off_and_keeps_ram(
    tiny_llama: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real write failure: the process may write no file larger than 4 KiB (EFBIG), like a full disk.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cache = cache_at(tiny_llama, tmp_path)
    engine = Engine(tiny_llama, cache=cache)
    engine.generate(PROMPT, GREEDY)
    ram_before = cache.stats().ram_bytes
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with caplog.at_level(logging.ERROR):
            cache.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "disk tier off" in caplog.text
    stats = cache.stats()
    assert not stats.disk_enabled and stats.ram_bytes == ram_before
    assert engine.generate(PROMPT, GREEDY).stats.cached_tokens > 0
