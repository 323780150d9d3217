"""Order a batch so neighbouring requests share the longest prompt prefix.

Pure: a function of each request's segment sequence (any hashable per segment, e.g. its token
ids), no MLX, no cache. `prefix` order walks a trie of the sequences depth-first, so every group
of requests that shares a prefix runs back to back while the cache still holds it; children are
visited in order of first appearance, which keeps the input order among unrelated requests.
`fifo` keeps the input order (the baseline).

Each slot also names its `leader`: the earliest scheduled request that shares the same prefix
(the one that computes it first). A runner that decodes several requests at once holds a request
back until its leader's prefill is done, so the group restores the prefix instead of every
member computing it concurrently.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

SCHEDULES = ("prefix", "fifo")


@dataclass(frozen=True)
class Slot:
    index: int  # position of the request in the input
    shared_segments: int  # leading segments shared with the previous slot (0 for the first)
    leader: int | None  # input index of the first slot with the same shared prefix; None: itself


@dataclass
class _TrieNode:
    children: dict[Hashable, _TrieNode] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # requests whose sequence ends here


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _depth_first(sequences: Sequence[Sequence[Hashable]]) -> list[int]:
    root = _TrieNode()
    for i, seq in enumerate(sequences):
        node = root
        for segment in seq:
            node = node.children.setdefault(segment, _TrieNode())
        node.ends.append(i)
    out: list[int] = []
    stack = [root]
    while stack:  # iterative: one long sequence must not hit the recursion limit
        node = stack.pop()
        out.extend(node.ends)
        stack.extend(reversed(node.children.values()))
    return out


def schedule(sequences: Sequence[Sequence[Hashable]], order: str = "prefix") -> list[Slot]:
    """The run order of requests given their segment sequences; raises ValueError on an unknown order.

    A permutation of range(len(sequences)). In `prefix` order every set of requests sharing a
    prefix is contiguous, so the longest prefix any earlier request shares with a slot is the
    one it shares with the slot just before it.
    """
    if order not in SCHEDULES:
        raise ValueError(f"unknown schedule {order!r}; one of: {', '.join(SCHEDULES)}")
    indices = list(range(len(sequences))) if order == "fifo" else _depth_first(sequences)
    slots: list[Slot] = []
    # run_start[d]: the first slot of the current run sharing d leading segments.
    run_start: list[int] = []
    for pos, i in enumerate(indices):
        seq = sequences[i]
        shared = _common_prefix(sequences[indices[pos - 1]], seq) if pos else 0
        del run_start[shared:]
        leader = run_start[shared - 1] if shared else None
        run_start.extend([i] * (len(seq) - len(run_start)))
        slots.append(Slot(i, shared, leader))
    return slots
