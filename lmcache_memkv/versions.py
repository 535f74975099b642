"""Writer-assigned versions: a hybrid logical clock, one per process.

A version is the wall clock in microseconds shifted left by 10 bits plus a random per-process
tag, never less than one past the last version issued or seen. Nodes keep the newest version
of each key, so replicas converge whatever order writes arrive in, and a write delayed in the
network cannot overwrite a newer one. Versions stay below 2**63, and nodes refuse versions
more than ``FUTURE_SLACK`` ahead of their own clock, so no client can push a key (or a node's
version floor) out of reach of every later writer.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable

TAG_BITS = 10
MAX_VERSION = (1 << 63) - 1
FUTURE_SLACK = 3600 * 1_000_000 << TAG_BITS  # one hour: clock skew a node tolerates


def wall_version(clock_ns: Callable[[], int] = time.time_ns) -> int:
    """The lowest version a writer whose clock reads now would issue."""
    return (clock_ns() // 1000) << TAG_BITS


class VersionClock:
    def __init__(self, clock_ns: Callable[[], int] = time.time_ns, tag: int | None = None) -> None:
        self._clock_ns = clock_ns
        self._tag = secrets.randbelow(1 << TAG_BITS) if tag is None else tag
        self._last = 0
        self._lock = threading.Lock()

    def next(self, n: int = 1) -> list[int]:
        """``n`` fresh versions, increasing."""
        with self._lock:
            now = ((self._clock_ns() // 1000) << TAG_BITS) | self._tag
            first = max(now, self._last + 1)
            self._last = min(first + n - 1, MAX_VERSION)
            return [min(first + i, MAX_VERSION) for i in range(n)]

    def observe(self, versions: Iterable[int]) -> None:
        """Move past versions seen from nodes, so this writer's next write outranks them (versions
        implausibly far ahead of this clock are ignored: they would stop it advancing)."""
        top = max(versions, default=0)
        if top > self._last and top <= wall_version(self._clock_ns) + FUTURE_SLACK:
            with self._lock:
                self._last = min(max(self._last, top), MAX_VERSION)


CLOCK = VersionClock()
