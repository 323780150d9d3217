"""Ray Serve's request router for ragcache replicas: prefix affinity by segment keys.

Ray Serve calls `choose_replicas` for each request before it is sent to a replica, in the process
that holds the deployment handle (the HTTP front). The request's first argument is a
`ReplicaRequest`, which carries its segment keys (`ragcache.affinity.prompt_segments`: the system
prompt, each chunk in prompt order, the conversation's turns) and its conversation id, so the
router ranks replicas with ragcache's `AffinityRouter` (the same logic the scale simulation
measures) instead of Ray Serve's default power-of-two choice, which ignores every cache.

The first rank holds the chosen replica alone; the others follow, and Ray Serve takes the least
loaded of them only if the chosen one refuses (its queue is full). Where the request really went
is recorded when Ray Serve reports it routed (`on_request_routed`), so the router's picture of
each replica's cache follows what was sent, not what was hoped.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from ragcache.affinity import AffinityRouter, AffinitySettings, Segment


def _routed_request(pending: PendingRequest | None) -> Any:
    """The ReplicaRequest of a pending call, or None (a call that carries none: status, ...)."""
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if hasattr(first, "segments") and hasattr(first, "conversation") else None


class SegmentAffinityRouter(RequestRouter):
    """Routes ReplicaRequests by the cached prefix each replica most likely holds.

    No FIFOMixin: it hands a chosen replica to the oldest pending request rather than to the
    one it was chosen for, which under concurrency would spend each affinity choice on another
    request (Ray Serve's own PrefixCacheAffinityRouter leaves it out too)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """`kwargs`: AffinitySettings fields (request_router_kwargs of the deployment)."""
        self._affinity = AffinityRouter([], AffinitySettings(**kwargs))

    def _name(self, replica_id: ReplicaID) -> str:
        return replica_id.unique_id

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {self._name(r.replica_id) for r in replicas}
        for name in live:
            self._affinity.add_replica(name)
        for name in set(self._affinity.names) - live:
            self._affinity.remove_replica(name)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._affinity.remove_replica(self._name(replica_id))

    def _load(self, replica: RunningReplica) -> int:
        return int(self.replica_queue_len_cache.get(replica.replica_id) or 0)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_load = sorted(candidate_replicas, key=self._load)
        request = _routed_request(pending_request)
        if request is None or not self._affinity.names:
            return [by_load]
        by_name = {self._name(r.replica_id): r for r in candidate_replicas}
        loads = {name: self._load(r) for name, r in by_name.items()}
        segments = [Segment(*segment) for segment in request.segments]
        decision = self._affinity.choose(segments, loads, request.conversation)
        chosen = by_name.get(decision.replica)
        if chosen is None:  # chosen among replicas no longer candidates: the least loaded
            return [by_load]
        return [[chosen], [r for r in by_load if r is not chosen]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        request = _routed_request(pending_request)
        if request is not None:
            segments = [Segment(*segment) for segment in request.segments]
            self._affinity.record(self._name(replica_id), segments, request.conversation)


__all__ = ["SegmentAffinityRouter"]
