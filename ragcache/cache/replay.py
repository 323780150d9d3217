"""Replay a prompt stream on the real radix tree and eviction policy, with size-only payloads.

For a model without snapshot layers (every layer a span kind, as Gemma 3 and Llama are here) a
node's bytes are exactly `n_tokens * bytes_per_token`, and the token hit rate depends only on the
tree, the policy and those sizes, not on the K/V values. `replay` makes the same tree calls, in
the same order, as `PrefixCache.begin` + the engine's captures + `finish` with
store_generated=False (match all but the last token, pin and touch the used path, insert at
every capture position, then the whole prompt), so policies can be compared on thousands of
requests without running the model. Pure: no MLX. A test and the benchmark check it against the
real `PrefixCache` on a real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragcache.cache.session import span_capture_plan, span_capture_positions
from ragcache.cache.tree import Node, RadixTree


@dataclass(frozen=True)
class _SizeOps:
    """PayloadOps whose payload is the byte count of a span."""

    bytes_per_token: int

    def n_bytes(self, payload: Any) -> int:
        return int(payload or 0)

    def split(self, payload: Any, at: int) -> tuple[Any, Any]:
        upper = at * self.bytes_per_token
        return upper, payload - upper


@dataclass
class ReplayResult:
    policy: str
    budget_bytes: int
    hit_tokens: int = 0
    prompt_tokens: int = 0
    hits: int = 0  # requests that restored at least one token
    evictions: int = 0
    peak_ram_bytes: int = 0
    ram_bytes: int = 0  # at the end: with an unbounded budget, the stream's distinct KV bytes
    curve: list[float] = field(default_factory=list)  # cumulative token hit rate per request

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def replay(
    prompts: Sequence[Sequence[int]],
    bytes_per_token: int,
    budget_bytes: int,
    policy: str = "pgdsf",
    window: int | None = None,
    checkpoint_every_tokens: int = 512,
) -> ReplayResult:
    """Run `prompts` through a fresh RadixTree as the prefix cache would; return the figures."""
    tree = RadixTree(_SizeOps(bytes_per_token), budget_bytes, policy)
    gap, tail = span_capture_plan(window, checkpoint_every_tokens)
    out = ReplayResult(policy, budget_bytes)
    for prompt in prompts:
        tokens = list(prompt)
        start, pinned = 0, None
        if len(tokens) >= 2:
            match = tree.match(tokens[: len(tokens) - 1])
            start = match.prefix_len
            if start:
                pinned = match.path[-1]
                tree.pin(pinned)
                tree.touch(pinned.path())
        out.hits += start > 0
        out.hit_tokens += start
        out.prompt_tokens += len(tokens)
        out.curve.append(out.hit_tokens / out.prompt_tokens)
        if len(tokens) < 2:
            continue
        for p in [*span_capture_positions(len(tokens), start, gap, tail), len(tokens)]:
            node = tree.insert(tokens[:p], lambda a, b: (b - a) * bytes_per_token)
            pinned = _repin(tree, pinned, node)
        if pinned is not None:
            tree.unpin(pinned)
    out.evictions, out.peak_ram_bytes, out.ram_bytes = (
        tree.evictions,
        tree.peak_ram_bytes,
        tree.ram_bytes,
    )
    return out


def _repin(tree: RadixTree, pinned: Node | None, node: Node | None) -> Node | None:
    # As CacheSession._keep: pin the deepest stored node, then release the previous pin.
    if node is None or node is pinned:
        return pinned
    tree.pin(node)
    if pinned is not None:
        tree.unpin(pinned)
    return node
