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
    # A match under this share of the request's tokens is no affinity (every replica soon holds
    # the system prompt): the least loaded replica gets it and so the work spreads.
    min_match_rate: float = 0.2


@dataclass(frozen=True)
class Segment:
    """One segment of a request as the router sees it: a stable key and its length in tokens."""

    key: str  # e.g. "system:<hash>", "chunk:<chunk_id>", "turn:<conversation>:<n>"
    tokens: int


def key_id(key: str) -> int:
    """A stable 63-bit id for a segment key (the tree is keyed by ints)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


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
        self._sticky: dict[str, str] = {}
        for r in self.replicas:
            self.add_replica(r)

    def add_replica(self, name: str) -> None:
        if name not in self._replicas:
            tree = RadixTree(_Lengths(), self.settings.tokens_per_replica, "lru")
            self._replicas[name] = _Replica(tree)

    def remove_replica(self, name: str) -> None:
        """A replica that died or was scaled away: forget it and the conversations it held."""
        self._replicas.pop(name, None)
        self._sticky = {c: r for c, r in self._sticky.items() if r != name}

    @property
    def names(self) -> list[str]:
        return list(self._replicas)

    def matched_tokens(self, name: str, segments: Sequence[Segment]) -> int:
        """Tokens of `segments`' prefix that replica `name`'s tree holds."""
        ids = [key_id(s.key) for s in segments]
        n = self._replicas[name].tree.match(ids).prefix_len
        return sum(s.tokens for s in segments[:n])

    def route(
        self,
        segments: Sequence[Segment],
        loads: Mapping[str, int] | None = None,
        conversation: str | None = None,
    ) -> Decision:
        """The replica for a request, and remember that it went there.

        `loads`: requests in flight per replica (missing: 0). Raises LookupError with no
        replicas.
        """
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
        if sticky in self._replicas and not imbalanced:
            decision = Decision(sticky, self.matched_tokens(sticky, segments), "sticky")
        elif imbalanced:
            decision = Decision(idlest, self.matched_tokens(idlest, segments), "balance")
        else:
            matched = {n: self.matched_tokens(n, segments) for n in names}
            best = max(names, key=lambda n: (matched[n], -load[n], -self._replicas[n].routed))
            total = sum(x.tokens for x in segments)
            if matched[best] > 0 and matched[best] >= s.min_match_rate * total:
                decision = Decision(best, matched[best], "affinity")
            else:
                decision = Decision(idlest, matched[idlest], "least-loaded")
        self._remember(decision.replica, segments)
        if conversation:
            self._sticky[conversation] = decision.replica
        return decision

    def _remember(self, name: str, segments: Sequence[Segment]) -> None:
        replica = self._replicas[name]
        replica.routed += 1
        ids = [key_id(s.key) for s in segments]
        lengths = tuple(s.tokens for s in segments)
        if ids:
            replica.tree.insert(ids, lambda a, b: lengths[a:b])
            replica.tree.touch(replica.tree.match(ids).path)


__all__ = ["AffinityRouter", "AffinitySettings", "Decision", "Segment", "key_id"]
