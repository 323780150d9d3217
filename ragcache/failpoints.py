"""Named fault-injection points, off unless `RAGCACHE_FAILPOINTS` names them.

Supervision is only trustworthy if it is tested against real crashes of the real process, so the
model worker's hot path has a few named points where a fault can be injected from outside, as
FoundationDB and TiKV do with their failpoints. `RAGCACHE_FAILPOINTS="worker.on_token=3"` makes
the third pass through `worker.on_token` raise `InjectedFault` (`=3+` every pass from the third
on; several points separated by commas). Unset, a point costs one dict lookup.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ragcache.errors import ConfigError

ENV = "RAGCACHE_FAILPOINTS"


class InjectedFault(RuntimeError):
    """Raised by an armed failpoint: a stand-in for a bug in the code around it."""


@dataclass
class _Point:
    at: int  # the pass that fails, counting from 1
    repeat: bool  # fail every pass from `at` on
    passes: int = 0


_points: dict[str, _Point] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[int, bool]]:
    """`"a=3,b=1+"` -> {"a": (3, False), "b": (1, True)}. Raises ConfigError on a bad spec."""
    out: dict[str, tuple[int, bool]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition("=")
        repeat = count.endswith("+")
        digits = count.rstrip("+")
        if not sep or not name or not digits.isdigit() or int(digits) < 1:
            raise ConfigError(
                f"{ENV} entry {item!r} is not NAME=N or NAME=N+", hint="e.g. worker.on_token=3"
            )
        out[name] = (int(digits), repeat)
    return out


def arm(spec: str) -> None:
    """Replace the armed points with `spec` (the format of RAGCACHE_FAILPOINTS); "" disarms all."""
    with _lock:
        _points.clear()
        for name, (at, repeat) in parse(spec).items():
            _points[name] = _Point(at, repeat)


def hit(name: str) -> None:
    """Pass through point `name`: raise InjectedFault if it is armed for this pass."""
    if not _points:
        return
    with _lock:
        point = _points.get(name)
        if point is None:
            return
        point.passes += 1
        fire = point.passes == point.at or (point.repeat and point.passes >= point.at)
    if fire:
        raise InjectedFault(f"failpoint {name} (pass {point.passes})")


arm(os.environ.get(ENV, ""))
