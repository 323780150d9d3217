"""Eviction policies: each one is a sort key over tree nodes, lowest evicted first.

Pure: no MLX. A policy sees only a node's counters (`hits`, `last_access`, `clock`, `n_tokens`,
`n_bytes`), never its payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Ranked(Protocol):
    hits: int  # requests whose matched path ran through this node (every ancestor counts a hit)
    last_access: int  # logical tick of the last hit or insert
    clock: float  # the tree's inflation clock when the node was last hit (GDSF aging)
    n_bytes: int

    @property
    def n_tokens(self) -> int: ...


SortKey = Callable[[Ranked], float]


def recompute_cost(node: Ranked) -> float:
    # Prefill time is close to linear in tokens for the spans we store; tokens stand in for seconds.
    return float(node.n_tokens)


POLICIES: dict[str, SortKey] = {
    # Least recently used first.
    "lru": lambda n: n.last_access,
    # RAGCache's PGDSF: cheap-to-recompute, rarely hit, large nodes go first; the clock ages old hits.
    "pgdsf": lambda n: n.clock + n.hits * recompute_cost(n) / max(n.n_bytes, 1),
    # Frequency alone (no aging), ties to the least recent: best when popularity never drifts.
    "lfu": lambda n: n.hits + n.last_access / 2**53,
}


def policy_key(name: str) -> SortKey:
    """The sort key of a policy by name. Raises KeyError naming the known policies."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None
