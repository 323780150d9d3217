"""Prefix-affinity routing: which replica most likely holds a request's longest cached prefix.

A router in front of N model replicas cannot see their KV caches. It can see what it sent where:
each request's *segment keys* (the system prompt's id, then each chunk's id in prompt order, then
the conversation's turns), known before any tokenizing. Per replica it keeps an approximate tree
of the key sequences it routed there (the same radix tree as the KV cache, over key ids, under a
budget in prompt tokens with LRU eviction, so it forgets roughly what the replica forgets), and
sends a request to the replica whose tree matches the longest prefix of its keys, weighted by
the tokens those keys stand for. Keying on chunk ids rather than raw text is what a RAG router
can do that a text router (SGLang's, Ray Serve's PrefixCacheAffinityRouter) cannot: two
prompts that share chunks A, B share them exactly, whatever the question after.

Load balance wins when replicas are uneven (SGLang's rule): when the busiest replica has more
than `balance_abs` requests in flight beyond the idlest and more than `balance_rel` times its
load, the request goes to the idlest. A conversation sticks to the replica that served its
first turn while that replica is there. Pure: no Ray, no model; property-tested and simulated
(benchmarks/scale.py), and used by serving replicas.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragcache.cache.tree import RadixTree


@dataclass(frozen=True)
class AffinitySettings:
    # Per replica: prompt tokens the router remembers (about its KV budget / bytes per token).
    tokens_per_replica: int = 2_000_000
    balance_abs: int = 4  # in-flight requests the busiest may have beyond the idlest ...
    balance_rel: float = 1.5  # ... and this many times the idlest's, before balance wins
    # A match under this share of the request's own tokens (those of segments not marked shared:
    # every replica soon holds the system prompt) is no affinity: the least loaded replica gets
    # the request, and so the work spreads.
    min_match_rate: float = 0.2
    max_conversations: int = 100_000  # sticky conversations remembered (least recent go first)


@dataclass(frozen=True)
class Segment:
    """One segment of a request as the router sees it: a stable key and its length in tokens."""

    key: str  # e.g. "system:<hash>", "chunk:<chunk_id>", "turn:<conversation>:<n>"
    tokens: int
    # Every replica soon holds it (the system prompt): matching it is no reason to prefer one.
    shared: bool = False


def key_id(key: str) -> int:
    """A stable 63-bit id for a segment key (the tree is keyed by ints)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def prompt_segments(
    tokens: Sequence[int], boundaries: Sequence[int], kinds: Sequence[str] = ()
) -> list[Segment]:
    """A tokenized prompt as the router sees it: one Segment per prompt segment, keyed by its
    token ids. Ragcache tokenizes each segment on its own (ragcache.segments), so a segment has
    the same key wherever the same tokens stand, exactly when the KV cache could reuse it: a
    chunk keyed with its numbered marker ("[2] ..."), as the cache sees it, the system prompt, a
    conversation turn, with no text to compare. A segment of kind "system" is marked shared."""
    out: list[Segment] = []
    start = 0
    for i, end in enumerate(boundaries):
        ids = tokens[start:end]
        digest = hashlib.blake2b(array("q", ids).tobytes(), digest_size=12)
        shared = i < len(kinds) and kinds[i] == "system"
        out.append(Segment(f"seg:{digest.hexdigest()}", len(ids), shared))
        start = end
    return out


class _Lengths:
    """PayloadOps for a router tree: a payload is the token length of each key of the span."""

    def n_bytes(self, payload: Any) -> int:
        return int(sum(payload)) if payload else 0

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        return tuple(payload[:at]), tuple(payload[at:])


@dataclass
class _Replica:
    tree: RadixTree
    routed: int = 0


@dataclass
class Decision:
    replica: str
    matched_tokens: int  # tokens of the request the chosen replica's tree held
    reason: str  # "affinity", "balance", "sticky", "least-loaded"


@dataclass
class AffinityRouter:
    """Chooses a replica per request. Not thread-safe: the caller serialises `route`."""

    replicas: Sequence[str]
    settings: AffinitySettings = field(default_factory=AffinitySettings)

    def __post_init__(self) -> None:
        self._replicas: dict[str, _Replica] = {}
        # conversation -> replica, least recently used first (bounded: a front runs for months)
        self._sticky: OrderedDict[str, str] = OrderedDict()
        for r in self.replicas:
            self.add_replica(r)

    def add_replica(self, name: str) -> None:
        if name not in self._replicas:
            tree = RadixTree(_Lengths(), self.settings.tokens_per_replica, "lru")
            self._replicas[name] = _Replica(tree)

    def remove_replica(self, name: str) -> None:
        """A replica that died or was scaled away: forget it and the conversations it held."""
        self._replicas.pop(name, None)
        self._sticky = OrderedDict((c, r) for c, r in self._sticky.items() if r != name)

    @property
    def names(self) -> list[str]:
        return list(self._replicas)

    def matched_tokens(self, name: str, segments: Sequence[Segment]) -> int:
        """Tokens of `segments`' prefix that replica `name`'s tree holds."""
        return sum(s.tokens for s in self._matched(name, segments))

    def _matched(self, name: str, segments: Sequence[Segment]) -> Sequence[Segment]:
        ids = [key_id(s.key) for s in segments]
        return segments[: self._replicas[name].tree.match(ids).prefix_len]

    def route(
        self,
        segments: Sequence[Segment],
        loads: Mapping[str, int] | None = None,
        conversation: str | None = None,
    ) -> Decision:
        """The replica for a request, and remember that it went there (`choose`, then `record`).

        `loads`: requests in flight per replica (missing: 0). Raises LookupError with no
        replicas.
        """
        decision = self.choose(segments, loads, conversation)
        self.record(decision.replica, segments, conversation)
        return decision

    def choose(
        self,
        segments: Sequence[Segment],
        loads: Mapping[str, int] | None = None,
        conversation: str | None = None,
    ) -> Decision:
        """The replica for a request, remembering nothing: a router whose choice may still be
        refused (a full replica) records where the request really went with `record`."""
        if not self._replicas:
            raise LookupError("no replica to route to")
        loads = loads or {}
        names = sorted(self._replicas)  # a fixed order: ties break the same way every time
        load = {n: int(loads.get(n, 0)) for n in names}
        idlest = min(names, key=lambda n: (load[n], self._replicas[n].routed, n))
        busiest = max(load.values())
        s = self.settings
        imbalanced = busiest - load[idlest] > s.balance_abs and busiest > s.balance_rel * max(
            load[idlest], 1
        )
        sticky = self._sticky.get(conversation) if conversation else None
        if sticky is not None and sticky in self._replicas and not imbalanced:
            return Decision(sticky, self.matched_tokens(sticky, segments), "sticky")
        if imbalanced:
            return Decision(idlest, self.matched_tokens(idlest, segments), "balance")
        held = {n: self._matched(n, segments) for n in names}
        matched = {n: sum(x.tokens for x in held[n]) for n in names}
        # What only this replica's cache would save: the matched tokens of unshared segments.
        gain = {n: sum(x.tokens for x in held[n] if not x.shared) for n in names}
        best = max(names, key=lambda n: (gain[n], matched[n], -load[n], -self._replicas[n].routed))
        own = sum(x.tokens for x in segments if not x.shared)
        if gain[best] > 0 and gain[best] >= s.min_match_rate * own:
            return Decision(best, matched[best], "affinity")
        return Decision(idlest, matched[idlest], "least-loaded")

    def record(
        self, replica: str, segments: Sequence[Segment], conversation: str | None = None
    ) -> None:
        """Remember that the request went to `replica` (so its prefix is there now). A replica
        the router does not know (removed meanwhile) is ignored."""
        if replica not in self._replicas:
            return
        self._remember(replica, segments)
        if conversation:
            self._sticky[conversation] = replica
            self._sticky.move_to_end(conversation)
            while len(self._sticky) > self.settings.max_conversations:
                self._sticky.popitem(last=False)

    def _remember(self, name: str, segments: Sequence[Segment]) -> None:
        replica = self._replicas[name]
        replica.routed += 1
        ids = [key_id(s.key) for s in segments]
        lengths = tuple(s.tokens for s in segments)
        if ids:
            replica.tree.insert(ids, lambda a, b: lengths[a:b])
            replica.tree.touch(replica.tree.match(ids).path)


__all__ = [
    "AffinityRouter",
    "AffinitySettings",
    "Decision",
    "Segment",
    "key_id",
    "prompt_segments",
]
