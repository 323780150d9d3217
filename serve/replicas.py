"""Model replicas on Ray Serve behind one HTTP front: `ragcache serve --replicas N`.

The front is the ordinary ragcache app (same routes, auth, limits, conversations, uploads): it
retrieves, orders and assembles each prompt itself, then hands the generation to a
`ReplicaPool`, which has the model worker's interface (`submit` -> a `Ticket` of events) and
sends the request to one of N `serve.replica.ModelReplica`s of a Ray Serve deployment, each a
whole model worker with its own KV tree and disk tier.

Which replica: `serve.replica_router.SegmentAffinityRouter`, Ray Serve's request-router API over
ragcache's `AffinityRouter`, keyed by the prompt's segments (the system prompt, each chunk, the
conversation's turns), so a request goes where its longest prefix most likely sits, load wins
when replicas are uneven, and a conversation stays on its replica. `routing="power-of-two"`
keeps Ray Serve's default (the baseline benchmarks/scale.py measures against).

A replica that dies mid-stream fails its requests with a retriable `ReplicaLostError` (503,
Retry-After); Ray Serve starts a new one, and the other replicas carry on. `/v1/cache` reports
the replicas' caches (broadcast: summed, and each replica's) and clears them all. What the front
does not have: cache-aware ordering against a replica's tree (the front orders chunks
canonically, which keeps prefixes shared).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ragcache.affinity import prompt_segments
from ragcache.engine import Completion, GenerationStats, TextDelta
from ragcache.errors import RagcacheError
from ragcache.runtime import Ticket, WorkerSettings
from ragcache.runtime.ticket import DONE
from ragcache.runtime.worker import QueueFullError, WorkerStoppedError
from ragcache.sampling import SamplingParams
from ragcache.segments import SegmentedPrompt
from ragcache.settings import Settings
from serve.replica import (
    ModelReplica,
    RemoteFailure,
    ReplicaFailedError,
    ReplicaHello,
    ReplicaLostError,
    ReplicaRequest,
    ReplicaRequestError,
)
from serve.settings import ServeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

APP_NAME = "ragcache"
DEPLOYMENT_NAME = "ModelReplica"  # then "-<routing>": see deployment_name
HEALTH_POLL_S = 2.0  # how often the pool asks Ray Serve how many replicas run


def _replica_gone(exc: BaseException) -> bool:
    from ray import exceptions as ray_errors

    return isinstance(exc, ray_errors.RayActorError | ray_errors.ActorUnavailableError)


class ReplicaPool:
    """The model worker's interface over Ray Serve replicas, for the HTTP front and batch jobs.

    Each submitted request is relayed on a thread of its own from the replica's stream into a
    Ticket, so handlers, batch runners and the CLI use it exactly as they use a ModelWorker.
    """

    def __init__(
        self,
        handle: Any,
        deployment: str,
        replicas: int,
        settings: WorkerSettings,
        check_fits: Callable[[int], None],
    ) -> None:
        # One streaming handle for every generation: its router (and so its picture of each
        # replica's cache) is shared by all of them.
        self._stream = handle.options(stream=True)
        self._handle = handle  # control calls, broadcast to every replica
        self.deployment = deployment
        self.replicas = replicas
        self.settings = settings
        self._check_fits = check_fits
        self._relays = ThreadPoolExecutor(settings.max_queue, thread_name_prefix="ragcache-relay")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._live: set[Ticket] = set()
        self._stopping = threading.Event()
        self.mean_request_s = 5.0
        self.completed = 0
        self.crashes = 0  # requests whose replica went away
        self.last_crash: str | None = None
        self.served_by: dict[str, int] = {}  # replica -> requests it streamed
        self.pids: dict[str, int] = {}  # replica -> its process
        # Asked on a thread of its own: Serve's status call can block, /ready must not.
        self._running_replicas = self.running_replicas()
        self._health = threading.Thread(target=self._poll_health, name="ragcache-replicas")
        self._health.daemon = True
        self._health.start()

    # -- the ModelWorker interface used by the app ----------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def queue_depth(self) -> int:
        return 0  # requests wait in the replicas' own queues

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def running(self) -> bool:
        return not self._stopping.is_set()

    @property
    def healthy(self) -> bool:
        """Running, with at least one replica Ray Serve reported running at its last poll."""
        return self.running and self._running_replicas > 0

    def running_replicas(self) -> int:
        """Replicas Ray Serve reports running now (0 when it cannot be asked)."""
        try:
            from ray import serve as ray_serve

            app = ray_serve.status().applications[APP_NAME]
            states: dict[Any, int] = dict(app.deployments[self.deployment].replica_states)
            return int(states.get("RUNNING", 0))
        except Exception:  # Serve gone or not started: no replica to count on
            return 0

    def _poll_health(self) -> None:
        while not self._stopping.wait(HEALTH_POLL_S):
            self._running_replicas = self.running_replicas()

    def cache_stats(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """Every replica's cache figures together: counters summed, the token hit rate
        recomputed from the sums, and each replica's own under "replicas". None when no
        replica has a cache."""
        each = [s for s in self._handle.broadcast("cache_stats").results(timeout_s=timeout_s) if s]
        if not each:
            return None
        total: dict[str, Any] = {}
        for key, value in each[0].items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            total[key] = sum(s.get(key, 0) for s in each) if numeric else value
        if total.get("prompt_tokens"):
            total["token_hit_rate"] = round(total["hit_tokens"] / total["prompt_tokens"], 4)
        total["replicas"] = each
        return total

    def clear_caches(self, timeout_s: float = 60.0) -> None:
        """Drop every replica's cached prefixes (RAM and disk tier)."""
        self._handle.broadcast("clear_cache").results(timeout_s=timeout_s)

    def call(self, fn: Callable[[], T], timeout: float | None = 60.0) -> T:
        """The front holds no model state: work meant for the model thread runs here."""
        return fn()

    def submit(
        self,
        prompt: SegmentedPrompt,
        params: SamplingParams | None = None,
        conversation: str | None = None,
    ) -> Ticket:
        """Queue a generation on a replica (`conversation`'s, if it has one). Raises
        QueueFullError, WorkerStoppedError, PromptTooLongError, InvalidRequestError before
        sending anything."""
        params = (params or SamplingParams()).validate()
        self._check_fits(len(prompt.tokens))
        if self._stopping.is_set():
            raise WorkerStoppedError("the server is stopping", hint="retry shortly")
        ticket = Ticket(next(self._ids))
        with self._lock:
            if len(self._live) >= self.settings.max_queue:
                per_slot = self.mean_request_s / max(1, self.settings.max_batch)
                depth = len(self._live)
                raise QueueFullError(depth, max(1.0, per_slot * depth))
            self._live.add(ticket)
        segments = tuple(
            (s.key, s.tokens, s.shared)
            for s in prompt_segments(prompt.tokens, prompt.boundaries, prompt.kinds)
        )
        request = ReplicaRequest(prompt, params, segments, conversation)
        try:
            self._relays.submit(self._relay, ticket, request)
        except RuntimeError as exc:  # the pool shut down between the check and here
            self._finished(ticket, 0.0)
            raise WorkerStoppedError("the server is stopping", hint="retry shortly") from exc
        return ticket

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the relayed ones finish (cancel them after `timeout`)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            live = list(self._live)
        for ticket in live:
            ticket.cancel()
        self._relays.shutdown(wait=False, cancel_futures=True)

    # -- relaying -------------------------------------------------------------------------------
    def _relay(self, ticket: Ticket, request: ReplicaRequest) -> None:
        started = time.monotonic()
        relayed: list[TextDelta] = []
        ended = False
        try:
            response = self._stream.generate.remote(request)
            ticket.add_cancel_callback(response.cancel)
            for item in response:
                if isinstance(item, ReplicaHello):
                    with self._lock:
                        self.served_by[item.replica] = self.served_by.get(item.replica, 0) + 1
                        self.pids[item.replica] = item.pid
                    ticket.replica = item.replica
                    continue
                if isinstance(item, RemoteFailure):
                    ticket.put(ReplicaRequestError(item))
                    ended = True
                    break
                if isinstance(item, TextDelta):
                    relayed.append(item)
                ticket.put(item)
                if isinstance(item, Completion):
                    ended = True
        except Exception as exc:
            ended = True
            if ticket.cancelled:
                ticket.put(_cancelled_completion(request, relayed, time.monotonic() - started))
            elif _replica_gone(exc):
                with self._lock:
                    self.crashes += 1
                    self.last_crash = f"{type(exc).__name__}: {str(exc)[:200]}"
                ticket.put(ReplicaLostError(exc))
            else:  # a bug or a value that did not cross the wire: a retry fails the same way
                log.exception("a replica request failed")
                ticket.put(ReplicaFailedError(exc))
        finally:
            if not ended:
                if ticket.cancelled:
                    ticket.put(_cancelled_completion(request, relayed, time.monotonic() - started))
                else:  # the stream ended without a Completion: the replica was torn down
                    gone = RuntimeError("the replica's stream ended before its answer")
                    ticket.put(ReplicaLostError(gone))
            ticket.put(DONE)
            self._finished(ticket, time.monotonic() - started)

    def _finished(self, ticket: Ticket, seconds: float) -> None:
        with self._lock:
            self._live.discard(ticket)
            if seconds > 0:
                self.completed += 1
                self.mean_request_s = 0.9 * self.mean_request_s + 0.1 * seconds


def _cancelled_completion(
    request: ReplicaRequest, relayed: list[TextDelta], seconds: float
) -> Completion:
    """The end of a stream cancelled from the front. The replica stopped the generation (and
    kept its KV) but a cancelled Ray stream says nothing more, so the figures the replica alone
    knows (cached tokens, prefill time) are 0 here; the text and tokens are what was relayed."""
    stats = GenerationStats(
        prompt_tokens=len(request.prompt.tokens),
        cached_tokens=0,
        recomputed_tokens=0,
        generated_tokens=len(relayed),
        ttft_s=0.0,
        prefill_s=0.0,
        decode_s=seconds,
        peak_memory_bytes=0,
        finish_reason="cancelled",
    )
    return Completion("".join(d.text for d in relayed), [d.token for d in relayed], stats)


# -- deploying ------------------------------------------------------------------------------------
@dataclass
class ReplicaDeployment:
    """N replicas running on Ray Serve, and how to take them down."""

    handle: Any
    replicas: int
    name: str  # the deployment's
    owns_cluster: bool  # a local Ray started for these replicas: Serve goes with them

    def close(self) -> None:
        _take_down(self.owns_cluster)


def _take_down(owns_cluster: bool) -> None:
    from ray import serve as ray_serve

    try:
        if owns_cluster:
            ray_serve.shutdown()  # Serve was ours alone; Ray itself ends with the process
        else:
            ray_serve.delete(APP_NAME)  # a joined cluster may run other apps: only ours goes
    except Exception:  # the cluster is already gone: nothing to take down
        log.warning("could not take the replicas down cleanly", exc_info=True)


def deployment_name(routing: str) -> str:
    """The deployment's name carries its routing: Ray Serve 2.60's handles in one process keep
    the request router of the first deployment of a name, even after `serve.shutdown` (a
    benchmark comparing routings in one process measured one router twice)."""
    return f"{DEPLOYMENT_NAME}-{routing}"


def deploy_replicas(settings: ServeSettings, core: Settings) -> ReplicaDeployment:
    """Start `settings.replicas` ModelReplicas on Ray Serve (the cluster at
    `settings.ray_address`, or a local one) and wait until they are ready.

    Raises ConfigError (bad replica settings), RayClusterError (Ray missing, the cluster
    unreachable or without the CPUs), and RagcacheError when the replicas cannot start.
    """
    from ragcache.ray_cluster import RayClusterError, connect

    settings.validate()
    n = int(settings.replicas or 1)
    need = n * settings.replica_cpus
    started = not _ray_initialized()
    ray = connect(settings.ray_address, num_cpus=max(os.cpu_count() or 1, math.ceil(need)))
    owns = started and not settings.ray_address
    # Serve would wait for replicas it cannot place forever (and /ready with it): say so now.
    cpus = float(ray.available_resources().get("CPU", 0.0))
    if cpus < need:
        raise RayClusterError(
            f"{n} replicas need {need:g} CPUs but the cluster has {cpus:g} free",
            hint="use fewer --replicas, or add nodes to the cluster",
        )
    from ray import serve as ray_serve
    from ray.serve.config import RequestRouterConfig

    from serve.replica_router import SegmentAffinityRouter

    router = (
        RequestRouterConfig(request_router_class=SegmentAffinityRouter)  # type: ignore[arg-type]
        if settings.routing == "affinity"
        else RequestRouterConfig()  # Ray Serve's power-of-two choices
    )
    deployment: Any = ray_serve.deployment(
        ModelReplica,
        name=deployment_name(settings.routing),
        num_replicas=n,
        max_ongoing_requests=settings.max_queue,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
        health_check_period_s=5.0,
        max_constructor_retry_count=2,
        request_router_config=router,
    )
    try:
        # No Ray Serve HTTP proxy: ragcache's own front serves HTTP (same API, auth, limits).
        ray_serve.start(proxy_location="Disabled")
        handle = ray_serve.run(
            # The replicas take no HTTP: they need no API key.
            deployment.bind(replace(settings, api_key=None), core),
            name=APP_NAME,
            route_prefix=None,
        )
    except Exception as exc:
        _take_down(owns)
        if owns:
            ray.shutdown()
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise RagcacheError(
            f"the model replicas did not start: {type(exc).__name__}: {last}",
            hint="run `ragcache serve` without --replicas to see the model's own error",
        ) from exc
    return ReplicaDeployment(handle, n, deployment_name(settings.routing), owns)


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False  # connect() says what to install
    return bool(ray.is_initialized())


def replica_pool(
    deployed: ReplicaDeployment, settings: ServeSettings, check_fits: Callable[[int], None]
) -> ReplicaPool:
    """The front's worker over `deployed`: queue limits are the replicas' together."""
    worker = WorkerSettings(
        max_queue=settings.max_queue * deployed.replicas,
        max_batch=settings.max_batch * deployed.replicas,
    )
    return ReplicaPool(deployed.handle, deployed.name, deployed.replicas, worker, check_fits)


__all__ = [
    "ReplicaDeployment",
    "ReplicaPool",
    "deploy_replicas",
    "deployment_name",
    "replica_pool",
]
