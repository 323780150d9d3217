"""Reaching a Ray cluster: the one connection rule shared by Ray ingest and Ray Serve replicas.

`connect` joins the cluster at an address ("auto", "ray://host:10001", "host:6379") or starts a
private one on this machine; `require_reachable` turns an address nobody answers at into an error
at once (Ray itself retries it for minutes). Both raise RayClusterError with what to do.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ragcache.errors import RagcacheError

ADDRESS_HINT = (
    "start one with `ray start --head`, or check --address (host:6379, ray://host:10001, auto)"
)


class RayClusterError(RagcacheError):
    """Ray is missing, or the cluster cannot be reached or used."""


def connect(address: str | None, num_cpus: int | None = None) -> Any:
    """`ray` initialised: the cluster at `address`, or a local one on this machine (with
    `num_cpus` CPUs when given). Raises RayClusterError with what to do."""
    try:
        import ray
    except ImportError as exc:
        raise RayClusterError(
            "this needs Ray (Ray Data for ingest, Ray Serve for replicas)",
            hint='pip install "ragcache[ray]"',
        ) from exc
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:  # callers check it answers (require_reachable) before they write anything
        kwargs["address"] = address
    else:
        # A private local cluster: no token to share with anybody.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, by Ray version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RayClusterError(
            f"cannot use the Ray cluster at {address or 'a new local cluster'}: "
            f"{type(exc).__name__}: {first}",
            hint=ADDRESS_HINT,
        ) from exc
    return ray


def require_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable cluster for minutes: a host:port that refuses a TCP connection
    within `timeout_s` is reported at once instead ("auto" is left to Ray)."""
    target = address.removeprefix("ray://")
    if target == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise RayClusterError(
            f"cannot use the Ray cluster at {address}: nothing answers there ({exc})",
            hint=ADDRESS_HINT,
        ) from exc


__all__ = ["ADDRESS_HINT", "RayClusterError", "connect", "require_reachable"]
