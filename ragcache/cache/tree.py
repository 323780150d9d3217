"""A radix tree of token spans with a byte budget, pins, and a lower (disk) tier.

Pure: payloads are opaque. `PayloadOps` tells the tree how big a payload is and how to cut one in
two; `LowerTier` (optional) takes nodes evicted from RAM and gives them back. Invariants:
- every path from the root spells a token prefix; siblings differ in their first token;
- a node's `checkpoint`, when present, is state at the node's *end*;
- RAM nodes are ancestor-closed (a RAM node's parent is in RAM), so only RAM leaves are evicted;
- `ram_bytes <= budget_bytes` after every public call;
- `pins` counts pinned descendants-or-self, so a pinned node's ancestors are pinned too.
Not thread-safe: the caller holds one lock around every call.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ragcache.cache.eviction import policy_key


class PayloadOps(Protocol):
    def n_bytes(self, payload: Any) -> int: ...  # None counts 0
    def split(self, payload: Any, at: int) -> tuple[Any, Any]: ...  # at: tokens into the span


class LowerTier(Protocol):
    budget_bytes: int
    enabled: bool

    def write(self, node: Node) -> bool: ...  # False: not written (the tier may have turned off)
    def read(
        self, node: Node
    ) -> tuple[Any, Any] | None: ...  # (payload, checkpoint); None: unreadable
    def delete(self, node: Node) -> None: ...


@dataclass(eq=False)
class Node:
    tokens: list[int]  # the edge label: this node's span
    start: int  # position of tokens[0] in the prompt
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)
    payload: Any = None  # span data, when in RAM
    checkpoint: Any = None  # state at `end`, when in RAM
    has_checkpoint: bool = False  # in whichever tier holds the node
    n_bytes: int = 0
    in_ram: bool = True
    on_disk: bool = False
    pins: int = 0
    hits: int = 0
    last_access: int = 0
    clock: float = 0.0
    disk_ref: Any = None  # the lower tier's handle

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def path(self) -> list[Node]:
        """Nodes from the root's child down to self."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


class Match(NamedTuple):
    path: list[Node]  # nodes touched by the match; the last may be matched only partly
    prefix_len: int  # tokens matched


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def contains_span(hay: Sequence[int], needle: Sequence[int]) -> bool:
    """Whether `needle` occurs contiguously in `hay` (byte search, aligned to whole tokens)."""
    if not needle or len(needle) > len(hay):
        return not needle
    h, n = array("q", hay).tobytes(), array("q", needle).tobytes()
    at = h.find(n)
    while at >= 0:
        if at % 8 == 0:
            return True
        at = h.find(n, at + 1)
    return False


class RadixTree:
    """Token-prefix tree holding opaque payloads under a RAM byte budget."""

    def __init__(
        self,
        ops: PayloadOps,
        budget_bytes: int,
        policy: str = "pgdsf",
        lower: LowerTier | None = None,
    ) -> None:
        self.ops = ops
        self.budget_bytes = budget_bytes
        self.key = policy_key(policy)
        self.lower = lower
        self.root = Node([], 0, None)
        self.ram_bytes = self.disk_bytes = self.peak_ram_bytes = 0
        self.evictions = self.spills = 0
        self.clock = 0.0
        self._tick = itertools.count(1)

    # -- lookup -------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> Match:
        """Walk as far as `tokens` agree with the tree. Changes nothing."""
        node, i, path = self.root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common_len(child.tokens, tokens[i : i + len(child.tokens)])
            path.append(child)
            i += n
            if n < len(child.tokens):
                break
            node = child
        return Match(path, i)

    def touch(self, path: Sequence[Node]) -> None:
        """Count a hit on every node of `path` (so a hit on a node counts for all its ancestors)."""
        tick = next(self._tick)
        for node in path:
            node.hits += 1
            node.last_access = tick
            node.clock = self.clock

    def pin(self, node: Node) -> None:
        """Protect `node` and its ancestors from eviction until `unpin(node)`."""
        while node.parent is not None:
            node.pins += 1
            node = node.parent

    def unpin(self, node: Node) -> None:
        while node.parent is not None:
            node.pins = max(0, node.pins - 1)
            node = node.parent

    # -- insert -------------------------------------------------------------------------------
    def insert(
        self,
        tokens: Sequence[int],
        payload_for: Callable[[int, int], Any],
        checkpoint_for: Callable[[], Any] | None = None,
    ) -> Node | None:
        """Make `tokens` a path ending exactly at a node; return that node, or None if it would not fit.

        `payload_for(a, b)` gives the span data of tokens[a:b] for the part not yet in the tree;
        `checkpoint_for()` the state at len(tokens), attached if the end node has none. Evicts
        unpinned RAM leaves off this path to make room; an entry that cannot fit evicts nothing.
        Disk-only nodes on the path are read back (a corrupt one is dropped and recomputed).
        """
        node, i, protect = self.root, 0, {id(self.root)}
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is not None and not child.in_ram:
                if self.load(child, protect) is None:
                    continue  # unreadable: dropped, so this span is new
                if not child.in_ram:
                    return None  # readable but no room to keep it
            if child is None:
                payload = payload_for(i, len(tokens))
                ckpt = checkpoint_for() if checkpoint_for else None
                need = self.ops.n_bytes(payload) + self.ops.n_bytes(ckpt)
                if not self.make_room(need, protect):
                    return None
                leaf = Node(list(tokens[i:]), i, node, payload=payload, checkpoint=ckpt)
                leaf.has_checkpoint, leaf.n_bytes = ckpt is not None, need
                leaf.clock, leaf.last_access = self.clock, next(self._tick)
                node.children[tokens[i]] = leaf
                self._add_ram(need)
                return leaf
            n = _common_len(child.tokens, tokens[i : i + len(child.tokens)])
            if n < len(child.tokens):
                child = self._split(child, n)
            protect.add(id(child))
            node, i = child, i + n
        if checkpoint_for is not None and not node.has_checkpoint and node is not self.root:
            ckpt = checkpoint_for()
            need = self.ops.n_bytes(ckpt)
            if not self.make_room(need, protect):
                return node
            node.checkpoint, node.has_checkpoint = ckpt, True
            node.n_bytes += need
            self._add_ram(need)
            self._forget_disk_copy(node)  # the file lacks the checkpoint now held
        return node

    def _split(self, node: Node, at: int) -> Node:
        """Cut `node` after `at` tokens; return the new upper node. The checkpoint stays below."""
        upper_payload, lower_payload = self.ops.split(node.payload, at)
        parent = node.parent
        assert parent is not None
        upper = Node(node.tokens[:at], node.start, parent, payload=upper_payload)
        upper.pins, upper.hits, upper.last_access, upper.clock = (
            node.pins,
            node.hits,
            node.last_access,
            node.clock,
        )
        upper.n_bytes = self.ops.n_bytes(upper_payload)
        before = node.n_bytes
        node.tokens, node.start, node.payload = node.tokens[at:], node.start + at, lower_payload
        node.n_bytes = self.ops.n_bytes(lower_payload) + self.ops.n_bytes(node.checkpoint)
        self._forget_disk_copy(node)
        parent.children[upper.tokens[0]] = upper
        upper.children[node.tokens[0]] = node
        node.parent = upper
        self._add_ram(upper.n_bytes + node.n_bytes - before)
        return upper

    def _add_ram(self, n_bytes: int) -> None:
        self.ram_bytes += n_bytes
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)

    # -- eviction -----------------------------------------------------------------------------
    def make_room(self, need: int, protect: set[int] | frozenset[int] = frozenset()) -> bool:
        """Evict RAM leaves (lowest policy key first) until `need` more bytes fit the budget.

        Pinned nodes and nodes whose id is in `protect` stay. Returns False, evicting nothing, when
        `need` cannot fit even after evicting everything evictable.
        """
        if need > self.budget_bytes:
            return False
        if self.ram_bytes + need <= self.budget_bytes:
            return True
        movable = [n for n in self.nodes() if n.in_ram and n.pins == 0 and id(n) not in protect]
        if self.ram_bytes - sum(n.n_bytes for n in movable) + need > self.budget_bytes:
            return False
        order = itertools.count()
        heap = [(self.key(n), next(order), n) for n in movable if self._is_ram_leaf(n)]
        heapq.heapify(heap)
        while self.ram_bytes + need > self.budget_bytes and heap:
            key, _, node = heapq.heappop(heap)
            parent = node.parent
            self._evict(node, key)
            if (
                parent is not None
                and parent is not self.root
                and parent.pins == 0
                and id(parent) not in protect
                and self._is_ram_leaf(parent)
            ):
                heapq.heappush(heap, (self.key(parent), next(order), parent))
        return self.ram_bytes + need <= self.budget_bytes

    @staticmethod
    def _is_ram_leaf(node: Node) -> bool:
        return node.in_ram and not any(c.in_ram for c in node.children.values())

    def _evict(self, node: Node, key: float) -> None:
        self.evictions += 1
        self.clock = max(self.clock, key)  # GDSF aging: new entries start above what was evicted
        lower = self.lower
        if lower is not None and lower.enabled and (node.on_disk or lower.write(node)):
            if not node.on_disk:
                node.on_disk = True
                self.disk_bytes += node.n_bytes
                self.spills += 1
            node.payload = node.checkpoint = None
            node.in_ram = False
            self.ram_bytes -= node.n_bytes
            self._trim_disk()
            return
        if lower is not None and not lower.enabled:
            self.drop_lower_tier()  # its files can no longer be read; RAM nodes stay
        self.drop(node)

    def _trim_disk(self) -> None:
        lower = self.lower
        while lower is not None and self.disk_bytes > lower.budget_bytes:
            candidates = [
                n
                for n in self.nodes()
                if n.on_disk and n.pins == 0 and (n.in_ram or not n.children)
            ]
            if not candidates:
                return
            victim = min(candidates, key=self.key)
            if victim.in_ram:
                self._forget_disk_copy(victim)
            else:
                self.drop(victim)

    def _forget_disk_copy(self, node: Node) -> None:
        if node.on_disk and self.lower is not None:
            self.lower.delete(node)
        if node.on_disk:
            self.disk_bytes -= node.n_bytes
        node.on_disk, node.disk_ref = False, None

    # -- lower tier ---------------------------------------------------------------------------
    def load(
        self, node: Node, protect: set[int] | frozenset[int] = frozenset()
    ) -> tuple[Any, Any] | None:
        """Read a disk-only node back; keep it in RAM if it fits. None (node dropped) if unreadable."""
        if node.in_ram:
            return node.payload, node.checkpoint
        data = self.lower.read(node) if self.lower is not None and self.lower.enabled else None
        if data is None:
            self.drop(node)
            return None
        if node.parent is not None and node.parent.in_ram and self.make_room(node.n_bytes, protect):
            node.payload, node.checkpoint = data
            node.in_ram = True
            self._add_ram(node.n_bytes)
        return data

    def add_lower_node(
        self, parent: Node, tokens: Sequence[int], n_bytes: int, has_checkpoint: bool, ref: Any
    ) -> Node | None:
        """Attach a node that lives only in the lower tier (a restart's index). None on a clash."""
        if not tokens or tokens[0] in parent.children:
            return None
        node = Node(list(tokens), parent.end, parent, in_ram=False, on_disk=True, disk_ref=ref)
        node.n_bytes, node.has_checkpoint = n_bytes, has_checkpoint
        parent.children[node.tokens[0]] = node
        self.disk_bytes += n_bytes
        return node

    def persist(self) -> int:
        """Copy every RAM node that has no disk copy down to the lower tier (parents first), so a
        restart finds whole paths; return how many were written."""
        written = 0
        for node in list(self.nodes()):
            lower = self.lower
            if lower is None or not lower.enabled:
                break
            if node.in_ram and not node.on_disk and lower.write(node):
                node.on_disk = True
                self.disk_bytes += node.n_bytes
                written += 1
        if self.lower is not None and not self.lower.enabled:
            self.drop_lower_tier()
        self._trim_disk()
        return written

    def drop_lower_tier(self) -> int:
        """Forget every disk-only node (the tier turned off); RAM nodes keep their data."""
        dropped = 0
        for node in [n for n in self.nodes() if not n.in_ram]:
            if node.parent is not None and node.parent.in_ram:
                dropped += self.drop(node)
        for node in self.nodes():
            node.on_disk, node.disk_ref = False, None
        self.disk_bytes, self.lower = 0, None
        return dropped

    # -- removal ------------------------------------------------------------------------------
    def drop(self, node: Node) -> int:
        """Remove `node` and its subtree from both tiers; return how many nodes went.

        Pinned nodes go too (their sessions hold their own references); parent links are kept so
        a later `unpin` still walks the ancestors it pinned.
        """
        parent = node.parent
        if parent is None or parent.children.get(node.tokens[0]) is not node:
            return 0
        del parent.children[node.tokens[0]]
        count = 0
        stack = [node]
        while stack:
            n = stack.pop()
            count += 1
            if n.in_ram:
                self.ram_bytes -= n.n_bytes
            self._forget_disk_copy(n)
            n.payload = n.checkpoint = None
            n.in_ram = False
            stack.extend(n.children.values())
        return count

    def invalidate(self, spans: Sequence[Sequence[int]]) -> int:
        """Drop every node whose prefix contains any of `spans`; return the number dropped."""
        spans = [list(s) for s in spans if len(s) > 0]
        dropped = 0
        stack: list[tuple[Node, list[int]]] = [(self.root, [])]
        while stack:
            node, prefix = stack.pop()
            for child in list(node.children.values()):
                path = prefix + child.tokens
                if any(contains_span(path[max(0, child.start - len(s) + 1) :], s) for s in spans):
                    dropped += self.drop(child)
                else:
                    stack.append((child, path))
        return dropped

    def clear(self) -> int:
        """Drop everything from both tiers; return the number of nodes dropped."""
        return sum(self.drop(child) for child in list(self.root.children.values()))

    def problems(self, expect_unpinned: bool = False) -> list[str]:
        """What is wrong with the tree's structure or byte accounting; [] when it is consistent.

        Run after a crash, when a half-done insert, split or eviction may have left it broken.
        `expect_unpinned`: no request holds a pin any more, so a pinned node is a leak.
        """
        found: list[str] = []
        ram = 0
        stack: list[Node] = [self.root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                if child.parent is not node or not child.tokens or child.tokens[0] != first:
                    found.append(f"node at {child.start} is linked under the wrong key or parent")
                if child.start != node.end:
                    found.append(f"node at {child.start} does not start where its parent ends")
                if child.in_ram:
                    if self.ops.n_bytes(child.payload) + self.ops.n_bytes(child.checkpoint) != (
                        child.n_bytes
                    ):
                        found.append(f"node at {child.start} holds other bytes than it counts")
                    ram += child.n_bytes
                if expect_unpinned and child.pins:
                    found.append(f"node at {child.start} is still pinned ({child.pins})")
                stack.append(child)
        if ram != self.ram_bytes:
            found.append(f"RAM bytes counted {self.ram_bytes}, held {ram}")
        return found

    def nodes(self) -> Iterator[Node]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
