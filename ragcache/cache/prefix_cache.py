"""The prefix cache of one loaded model: restore the deepest cached prefix, capture the rest.

`PrefixCache.begin` matches a prompt against the tree, restores a fresh mlx-lm cache to the deepest
position every layer can resume from (anywhere when every layer is a span kind, sliding-window
layers included; a checkpoint when the model has snapshot layers), pins that path and returns a
`CacheSession`. The engine prefills the rest, pausing
at `capture_positions` to call `capture`, and ends with `finish` (store) or `abort` (don't).
All public methods take one lock, so a server may call them from several threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ragcache import failpoints
from ragcache.cache.chunk_kv import (
    CopiedKV,
    Piece,
    assembled_key,
    chunk_key,
    plan_assembly,
    rerotate,
    rope_modules,
)
from ragcache.cache.disk import DiskTier, TierIdentity, path_key
from ragcache.cache.disk_file import array_dtypes
from ragcache.cache.layers import (
    Codec,
    KVSpans,
    LayerKind,
    SpanMissing,
    evaluate,
    layer_kind,
    n_bytes,
)
from ragcache.cache.session import (
    CacheSession,
    capture_positions,
    span_capture_plan,
    span_capture_positions,
)
from ragcache.cache.settings import CacheSettings
from ragcache.cache.stats import CacheStats, LookupStats
from ragcache.cache.tree import Node, RadixTree
from ragcache.model_loader import LoadedModel

log = logging.getLogger(__name__)


class _LayerOps:
    """PayloadOps for the tree: a payload is one entry per layer (None where the kind keeps none)."""

    def __init__(self, kinds: Sequence[LayerKind]) -> None:
        self.kinds = kinds

    def n_bytes(self, payload: Any) -> int:
        return n_bytes(payload)

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        pairs = [
            k.split(p, at) if p is not None else (None, None)
            for k, p in zip(self.kinds, payload, strict=True)
        ]
        upper, lower = tuple(a for a, _ in pairs), tuple(b for _, b in pairs)
        evaluate((upper, lower))
        return upper, lower


class PrefixCache:
    """One tree of KV spans and checkpoints per loaded model, shared by every request."""

    def __init__(self, loaded: LoadedModel, settings: CacheSettings | None = None) -> None:
        """Probe the model's layer kinds; rebuild the tree from the disk tier if one is configured.

        Raises ConfigError on invalid settings. An unusable budget or an unsupported layer kind
        turns caching off with a warning (generation still works, from scratch).
        """
        self.loaded = loaded
        self.settings = settings = (settings or CacheSettings()).validate().resolved()
        self._lock = threading.RLock()
        self.lookups = self.hits = self.hit_tokens = self.prompt_tokens = self.invalidated = 0
        self.prefill_tps = 0.0  # measured between captures; 0 until known
        codec = Codec(settings.kv_bits, settings.kv_group_size)
        probe = make_prompt_cache(loaded.model)
        kinds = [layer_kind(c, codec) for c in probe]
        self.kinds: list[LayerKind] = [k for k in kinds if k is not None]
        self.snapshots = any(not k.spans for k in self.kinds)
        # The shortest sliding window among span layers: captures must come at most this far apart.
        self.window = min((k.window for k in self.kinds if k.window), default=None)
        self.kv_dtypes = ""  # of the stored arrays, known once the probe has run
        self.min_node_bytes = self._smallest_node_bytes(probe) if None not in kinds else 0
        self.enabled = settings.enabled and self._usable(kinds)
        self.ropes = rope_modules(loaded.model)
        self.chunk_unsupported = self._chunk_unsupported()
        self.chunk_lookups = self.chunk_tokens = self.chunk_entries = 0
        self.disk: DiskTier | None = None
        if self.enabled and settings.disk_dir is not None:
            identity = TierIdentity.current(
                loaded.identity, settings.kv_bits, settings.kv_group_size, self.kv_dtypes
            )
            disk = DiskTier(settings.disk_dir, identity, settings.disk_bytes)
            self.disk = disk if disk.enabled else None
        self.tree = RadixTree(
            _LayerOps(self.kinds), settings.budget_bytes, settings.policy, self.disk
        )
        if self.disk is not None:
            self._rebuild_from_disk(self.disk)

    def _usable(self, kinds: Sequence[LayerKind | None]) -> bool:
        if None in kinds:
            names = sorted(
                {
                    type(c).__name__
                    for c, k in zip(make_prompt_cache(self.loaded.model), kinds, strict=True)
                    if k is None
                }
            )
            log.warning("prefix cache off: no adapter for layer cache kind(s) %s", ", ".join(names))
            return False
        if self.settings.budget_bytes < max(1, self.min_node_bytes):
            log.warning(
                "prefix cache off: cache_bytes=%d is below the smallest node (%d bytes); "
                "generation works without reuse",
                self.settings.budget_bytes,
                self.min_node_bytes,
            )
            return False
        return True

    def _chunk_unsupported(self) -> str | None:
        """Why chunk reuse cannot run on this model (None: it can)."""
        if not self.enabled:
            return "the prefix cache is off"
        if not all(isinstance(k, KVSpans) for k in self.kinds):
            return "the model has sliding-window or recurrent layers"
        if self.ropes is None or len(self.ropes) != len(self.kinds):
            return "the model's position encoding cannot be re-rotated exactly"
        return None

    def _smallest_node_bytes(self, probe: list[Any]) -> int:
        # One real token through the model: the bytes one token's span and checkpoint would take.
        self.loaded.model(mx.array([[0]]), cache=probe)
        data = [
            (k.take_span(c, 0, 1), k.take_snapshot(c))
            for k, c in zip(self.kinds, probe, strict=True)
        ]
        evaluate(data)
        self.kv_dtypes = array_dtypes(data)
        return n_bytes(data)

    def _rebuild_from_disk(self, disk: DiskTier) -> None:
        # Entries come parents first; one whose parent is missing here may be another process's
        # (its parent in that process's RAM), so it is left alone, not deleted.
        by_path: dict[str, Node] = {}
        for entry in disk.entries():
            parent = self.tree.root if entry.parent is None else by_path.get(entry.parent)
            if parent is None or parent.end != entry.start:
                continue
            node = self.tree.add_lower_node(
                parent, entry.tokens, entry.n_bytes, entry.has_checkpoint, entry.ref
            )
            if node is not None:  # None: a sibling cut another way came first
                by_path.setdefault(entry.path, node)
        if by_path:
            log.info("KV disk tier: %d nodes from %s", len(by_path), disk.folder)

    # -- lookup -------------------------------------------------------------------------------
    def begin(self, tokens: Sequence[int], boundaries: Sequence[int] = ()) -> CacheSession:
        """Restore the deepest prefix of `tokens` every layer can resume from; pin its path.

        The session's `prompt_cache` is a fresh list of mlx-lm caches covering tokens[:start], with
        start <= len(tokens) - 1. Disk nodes are read back only when predicted faster than
        recomputing them. Never raises for a cache problem: the worst case is start = 0.
        """
        tokens = list(tokens)
        with self._lock:
            if not self.enabled or len(tokens) < 2:
                return self._cold(tokens, boundaries)
            restored = None
            for _ in range(4):  # a corrupt disk file drops nodes: match again without them
                restored = self._restore(tokens)
                if restored is not None:
                    break
            if restored is None:
                return self._cold(tokens, boundaries)
            prompt_cache, start, used, lookup = restored
            if used is not None:
                self.tree.pin(used)
                self.tree.touch(used.path())
            self._count(lookup)
            positions = self._capture_positions(tokens, start, boundaries)
            self._check_disk()
            return CacheSession(self, tokens, prompt_cache, start, positions, used, lookup)

    def _cold(self, tokens: list[int], boundaries: Sequence[int]) -> CacheSession:
        n = len(tokens)
        lookup = LookupStats(n, 0, 0, 0, 0, None, n)
        if self.enabled:
            self._count(lookup)
        positions = self._capture_positions(tokens, 0, boundaries) if self.enabled else []
        return CacheSession(
            self, tokens, make_prompt_cache(self.loaded.model), 0, positions, None, lookup
        )

    def _count(self, lookup: LookupStats) -> None:
        self.lookups += 1
        self.hits += lookup.start > 0
        self.hit_tokens += lookup.start
        self.prompt_tokens += lookup.prompt_tokens

    def _resume_points(self, path: list[Node], prefix_len: int) -> list[tuple[int, int]]:
        """(position, index of the last node needed) for every position all layers can resume at."""
        if not self.snapshots:
            return [(prefix_len, len(path) - 1)] if prefix_len else []
        return [(n.end, i) for i, n in enumerate(path) if n.has_checkpoint and n.end <= prefix_len]

    def _restore(self, tokens: list[int]) -> tuple[list[Any], int, Node | None, LookupStats] | None:
        match = self.tree.match(tokens[: len(tokens) - 1])
        path, points = match.path, self._resume_points(match.path, match.prefix_len)
        n_ram = next((i for i, n in enumerate(path) if not n.in_ram), len(path))
        ram_points = [p for p in points if p[1] < n_ram]
        if not self.snapshots and n_ram < len(path):
            ram_points = [(path[n_ram].start, n_ram - 1)] if path[n_ram].start else []
        best_ram = max(ram_points, default=(0, -1))
        best = max(points, default=(0, -1))
        if best[0] > best_ram[0] and not self._disk_worth_it(
            path[n_ram : best[1] + 1], best[0] - best_ram[0]
        ):
            best = best_ram
        position, last = best
        data: list[tuple[Any, Any]] = []
        protect = {id(self.tree.root)} | {id(n) for n in path[: last + 1]}
        for node in path[: last + 1]:
            loaded = self.tree.load(node, protect)
            if loaded is None:
                return None  # corrupt file, node dropped: match again
            data.append(loaded)
        lookup = self._lookup(tokens, match.prefix_len, position, path[: last + 1], n_ram)
        if position == 0:
            return make_prompt_cache(self.loaded.model), 0, None, lookup
        cut = (
            position - path[last].start
        )  # tokens of the last node used (a partial node: span kinds)
        caches = []
        for i, kind in enumerate(self.kinds):
            spans = [payload[i] for payload, _ in data[:-1]]
            if data[-1][0][i] is not None:
                last_span = data[-1][0][i]
                if cut < path[last].n_tokens:
                    last_span = kind.split(last_span, cut)[0]
                spans.append(last_span)
            checkpoint = data[-1][1]
            caches.append(kind.restore(spans, checkpoint[i] if checkpoint else None, position))
        used = path[last] if path[last].parent is not None else None
        return caches, position, used, lookup

    def _lookup(
        self, tokens: list[int], matched: int, position: int, used: list[Node], n_ram: int
    ) -> LookupStats:
        ram_tokens = min(position, used[n_ram].start) if n_ram < len(used) else position
        return LookupStats(
            prompt_tokens=len(tokens),
            matched_tokens=matched,
            start=position,
            ram_tokens=ram_tokens,
            disk_tokens=position - ram_tokens,
            checkpoint_position=position if self.snapshots and position else None,
            recomputed_tokens=len(tokens) - position,
        )

    def _disk_worth_it(self, nodes: list[Node], extra_tokens: int) -> bool:
        # Unmeasured rates favour the disk: the first read measures it.
        if self.disk is None or not self.disk.enabled:
            return False
        if not self.disk.read_bps or not self.prefill_tps:
            return True
        read_s = sum(n.n_bytes for n in nodes if not n.in_ram) / self.disk.read_bps
        return read_s < extra_tokens / self.prefill_tps

    def _capture_positions(
        self, tokens: list[int], start: int, boundaries: Sequence[int]
    ) -> list[int]:
        every = self.settings.checkpoint_every_tokens
        if not self.snapshots:  # span layers resume anywhere: no checkpoints at boundaries
            gap, tail = span_capture_plan(self.window, every)
            return span_capture_positions(len(tokens), start, gap, tail)
        have = {n.end for n in self._checkpointed_path(tokens)}
        return capture_positions(len(tokens), start, boundaries, every, have)

    def _checkpointed_path(self, tokens: list[int]) -> list[Node]:
        match = self.tree.match(tokens)
        return [n for n in match.path if n.has_checkpoint and n.end <= match.prefix_len]

    # -- chunk entries (ragcache.cache.chunk_kv) ----------------------------------------------
    def assemble(
        self, session: CacheSession, chunk_spans: Sequence[tuple[int, int]]
    ) -> list[CopiedKV]:
        """Plan `session`'s prompt with chunk reuse: the K/V to copy (the caller computes the
        rest): first the longest stored assembled prompt this one starts with, when it reaches
        past the exact prefix, then chunk entries for the chunks after it. Limits the session to
        storing what stays exact, and has it store the chunks it computes as entries, and the
        assembled prompt, at `finish`. Never raises for a cache problem: the worst case is no
        copy (everything computed)."""
        with self._lock:
            session.chunk_spans = list(chunk_spans)
            if self.chunk_unsupported is not None:
                return []
            assert self.ropes is not None  # else chunk_unsupported says why
            tokens = session.tokens
            copies: list[CopiedKV] = []
            start = session.start
            earlier = self._entry(assembled_key(tokens[: len(tokens) - 1]), whole=False)
            if (
                earlier is not None
                and earlier[0][0].shape[2] - start >= self.settings.chunk_min_tokens
            ):
                # Stored where it stands (no rotation): offset start - 1 moves it by nothing.
                layers = [(k[..., start:, :], v[..., start:, :]) for k, v in earlier]
                end = start + layers[0][0].shape[2]
                copies.append(CopiedKV(start, end, start - 1, layers, self.ropes))
                start = end
            entries: dict[int, list[tuple[mx.array, mx.array]]] = {}
            for i, (a, b) in enumerate(chunk_spans):
                if a >= start:
                    found = self._entry(chunk_key(tokens[a:b]), whole=True)
                    if found is not None:
                        entries[i] = found
            pieces = plan_assembly(
                len(tokens),
                start,
                chunk_spans,
                entries.__contains__,
                self.settings.chunk_recompute_tokens,
                self.settings.chunk_min_tokens,
            )
            copies += [_copied(p, entries, self.ropes) for p in pieces if p.copied]
            self.chunk_lookups += 1
            if copies:
                copied = sum(c.end - c.start for c in copies)
                self.chunk_tokens += copied
                session.exact_until = copies[0].start
                session.capture_positions = [
                    p for p in session.capture_positions if p <= copies[0].start
                ]
                lookup = session.lookup
                session.lookup = replace(
                    lookup,
                    chunk_tokens=copied,
                    recomputed_tokens=lookup.recomputed_tokens - copied,
                )
                # Chunks before `start` came with the stored prompt: no entry to make for them.
                reused = {c.chunk for c in pieces if c.copied}
                session.chunk_spans = [
                    s for i, s in enumerate(chunk_spans) if i not in reused and s[0] >= start
                ]
            return copies

    def _entry(self, key: Sequence[int], whole: bool) -> list[tuple[mx.array, mx.array]] | None:
        """Per layer (keys, values) of a marked entry's tokens after its mark: of the whole key
        (`whole`: a chunk entry, None unless all there), or of the longest stored prefix of it
        (an assembled prompt, None when not even one token is)."""
        match = self.tree.match(key)
        if match.prefix_len < (len(key) if whole else 2):
            return None
        protect = {id(self.tree.root)} | {id(n) for n in match.path}
        data = []
        for node in match.path:
            loaded = self.tree.load(node, protect)
            if loaded is None:
                return None  # unreadable disk copy, dropped: compute instead
            data.append(loaded[0])
        n = match.prefix_len
        cut = n - match.path[-1].start
        out = []
        for i, kind in enumerate(self.kinds):
            spans = [payload[i] for payload in data]
            if cut < match.path[-1].n_tokens:
                spans[-1] = kind.split(spans[-1], cut)[0]
            cache = kind.restore(spans, None, n)
            out.append((cache.keys[..., 1:n, :], cache.values[..., 1:n, :]))
        self.tree.touch(match.path)
        return out

    def store_chunks(
        self, live: Sequence[Any], tokens: Sequence[int], spans: Sequence[tuple[int, int]]
    ) -> int:
        """Store the chunks at `spans` of `tokens` (whose K/V `live` holds) as chunk entries,
        keys rotated back to the canonical position; return how many were new."""
        with self._lock:
            if self.chunk_unsupported is not None or not spans:
                return 0
            added = 0
            for a, b in spans:
                key = chunk_key(tokens[a:b])
                if b <= a or any(getattr(c, "offset", 0) < b for c in live):
                    continue
                if self.tree.match(key).prefix_len == len(key):
                    continue
                if self._insert_marked(key, live, a, rotate=True) is not None:
                    added += 1
            self.chunk_entries += added
            self._check_disk()
            return added

    def store_assembled(self, live: Sequence[Any], tokens: Sequence[int]) -> None:
        """Store a prompt whose K/V was partly copied (with what it generated), whole, for the
        next request that starts like it (`assemble`). Copies only what the tree lacks."""
        with self._lock:
            if self.chunk_unsupported is not None or len(tokens) < 2:
                return
            if any(getattr(c, "offset", 0) < len(tokens) for c in live):
                return
            self._insert_marked(assembled_key(tokens), live, 0, rotate=False)
            self._check_disk()

    def _insert_marked(
        self, key: list[int], live: Sequence[Any], first: int, rotate: bool
    ) -> Node | None:
        """Insert a marked entry whose token j (after the mark) is live position first + j;
        `rotate`: keys rotated to the canonical layout (token j at position j + 1), else kept
        at their own positions. The mark's own position holds zeros."""
        ropes = self.ropes
        assert ropes is not None
        delta = 1 - first if rotate else 0

        def payload_for(x: int, y: int) -> Any:
            # Tree positions [x, y): live positions [first + x - 1, first + y - 1), mark at 0.
            spans = []
            for kind, cache, rope in zip(self.kinds, live, ropes, strict=True):
                lo = first + max(x, 1) - 1
                keys = rerotate(cache.keys[..., lo : first + y - 1, :], rope, delta)
                values = cache.values[..., lo : first + y - 1, :]
                if x == 0:
                    pad = mx.zeros((*keys.shape[:2], 1, keys.shape[3]), dtype=keys.dtype)
                    keys = mx.concatenate([pad, keys], axis=2)
                    values = mx.concatenate([pad.astype(values.dtype), values], axis=2)
                c = KVCache()
                c.keys, c.values, c.offset = keys, values, keys.shape[2]
                spans.append(kind.take_span(c, 0, y - x))
            data = tuple(spans)
            evaluate(data)
            return data

        return self.tree.insert(key, payload_for, None)

    # -- store (called by CacheSession) -------------------------------------------------------
    def store(self, session: CacheSession, tokens: Sequence[int], checkpoint: bool) -> Node | None:
        """Insert tokens (which session.prompt_cache covers exactly) and, if asked, a checkpoint.

        Copies only what the tree lacks; returns the node ending at len(tokens), or None if it did
        not fit, the cache's length disagrees with `tokens`, or a windowed layer no longer holds
        the K/V of the tokens the tree lacks (then nothing is stored). Span layers may cover more
        than `tokens` (a prompt stored without its continuation); a checkpoint needs exactly it.
        """
        with self._lock:
            p = len(tokens)
            if not self.enabled or p == 0:
                return None
            offsets = {c.offset for c in session.prompt_cache if hasattr(c, "offset")}
            exact = offsets == {p}
            if not exact and (len(offsets) != 1 or min(offsets) < p or self.snapshots):
                log.warning("prefix cache: cache covers %s tokens, not %d; not stored", offsets, p)
                return None
            live = session.prompt_cache

            def payload_for(a: int, b: int) -> Any:
                data = tuple(k.take_span(c, a, b) for k, c in zip(self.kinds, live, strict=True))
                evaluate(data)
                return data

            def checkpoint_for() -> Any:
                data = tuple(k.take_snapshot(c) for k, c in zip(self.kinds, live, strict=True))
                evaluate(data)
                return data

            try:
                node = self.tree.insert(
                    tokens, payload_for, checkpoint_for if checkpoint and self.snapshots else None
                )
            except SpanMissing as exc:  # the path stops at what was stored exactly
                log.debug("prefix cache: %s; stored path ends earlier", exc)
                node = None
            self._check_disk()
            return node

    def measured_prefill(self, n_tokens: int, seconds: float) -> None:
        if n_tokens > 0 and seconds > 0:
            rate = n_tokens / seconds
            self.prefill_tps = rate if not self.prefill_tps else 0.7 * self.prefill_tps + 0.3 * rate

    def unpin(self, node: Node) -> None:
        with self._lock:
            self.tree.unpin(node)

    def pin(self, node: Node) -> None:
        with self._lock:
            self.tree.pin(node)

    def _check_disk(self) -> None:
        # A failed write (on the writer thread) turns the tier off: forget what only it held.
        if self.disk is not None and not self.disk.enabled:
            self.tree.drop_lower_tier()
            self.disk = None

    def _removing(self) -> AbstractContextManager[None]:
        # Dropping nodes normally only forgets their files; invalidate and clear unlink them.
        return self.disk.removing() if self.disk is not None else nullcontext()

    # -- control ------------------------------------------------------------------------------
    def invalidate(self, token_spans: Sequence[Sequence[int]]) -> int:
        """Drop every node (both tiers) whose prefix contains one of `token_spans`; return how many."""
        failpoints.hit("cache.invalidate")
        with self._lock:
            with self._removing():
                dropped = self.tree.invalidate(token_spans)
            self.invalidated += dropped
            self._check_disk()
            return dropped

    def recover(self) -> bool:
        """After a worker crash, with no request running: keep the tree if it is consistent,
        else drop it (both tiers). Returns True when it was kept.

        Pins are reset: every session was failed, so none is live, and a pin a crashed request
        left behind would keep its nodes from eviction forever.
        """
        with self._lock:
            problems = self.tree.problems()
            for node in self.tree.nodes():
                node.pins = 0
            if not problems:
                return True
            log.warning("KV cache dropped after a worker crash: %s", "; ".join(problems[:3]))
            self.tree.clear()
            self.tree.ram_bytes = 0
            self._check_disk()
            return False

    def clear(self) -> None:
        """Drop every node from RAM and disk. Running sessions keep what they restored."""
        with self._lock:
            with self._removing():
                self.tree.clear()
            self._check_disk()

    def flush(self) -> None:
        """Copy RAM nodes down to the disk tier and wait until every queued write is on disk,
        so a restart (or another process) starts warm. Holds the cache's lock meanwhile."""
        with self._lock:
            if self.disk is not None:
                self.tree.persist()
                self.disk.flush()
                self._check_disk()

    def top_paths(self, limit: int = 24, label_tokens: int = 48) -> list[dict[str, Any]]:
        """The `limit` most-hit nodes and their ancestors, parents first: the shape of what is
        cached (system prompt -> chunks -> questions), for people to look at. Each node: an id,
        its parent's id (None under the root), position, size, hits, tier, and its first
        `label_tokens` token ids (the caller decodes them)."""
        with self._lock:
            ranked = sorted(self.tree.nodes(), key=lambda n: n.hits, reverse=True)[:limit]
            keep = {id(a) for n in ranked for a in n.path()}
            root = self.tree.root
            return [
                {
                    "id": id(n),
                    "parent": None if n.parent is root or n.parent is None else id(n.parent),
                    "start": n.start,
                    "tokens": n.n_tokens,
                    "hits": n.hits,
                    "bytes": n.n_bytes,
                    "in_ram": n.in_ram,
                    "on_disk": n.on_disk,
                    "label_ids": list(n.tokens[:label_tokens]),
                }
                for n in self.tree.nodes()
                if id(n) in keep
            ]

    def stats(self) -> CacheStats:
        with self._lock:
            nodes = list(self.tree.nodes())
            return CacheStats(
                enabled=self.enabled,
                disk_enabled=self.disk is not None and self.disk.enabled,
                policy=self.settings.policy,
                budget_bytes=self.settings.budget_bytes,
                ram_bytes=self.tree.ram_bytes,
                ram_nodes=sum(n.in_ram for n in nodes),
                peak_ram_bytes=self.tree.peak_ram_bytes,
                disk_bytes=self.tree.disk_bytes,
                disk_nodes=sum(n.on_disk for n in nodes),
                checkpoints=sum(n.has_checkpoint for n in nodes),
                lookups=self.lookups,
                hits=self.hits,
                misses=self.lookups - self.hits,
                hit_tokens=self.hit_tokens,
                prompt_tokens=self.prompt_tokens,
                evictions=self.tree.evictions,
                spills=self.tree.spills,
                disk_reads=self.disk.reads if self.disk else 0,
                disk_errors=self.disk.errors if self.disk else 0,
                invalidated=self.invalidated,
                chunk_lookups=self.chunk_lookups,
                chunk_tokens=self.chunk_tokens,
                chunk_entries=self.chunk_entries,
            )


def _copied(
    piece: Piece, entries: dict[int, list[tuple[mx.array, mx.array]]], ropes: Sequence[Any]
) -> CopiedKV:
    assert piece.chunk is not None
    a, b = piece.offset, piece.offset + piece.end - piece.start
    layers = [(k[..., a:b, :], v[..., a:b, :]) for k, v in entries[piece.chunk]]
    return CopiedKV(piece.start, piece.end, piece.offset, layers, ropes)


__all__ = ["PrefixCache", "path_key"]
