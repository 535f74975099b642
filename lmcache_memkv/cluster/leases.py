"""Leases this client holds (per key, a multiset of granting nodes) and releases still owed.

A key may be leased several times (LMCache locks per request), on different nodes if the
view changed in between; each release returns one lease, by its id, to the node that granted
it. Releases name lease ids, so a retry is harmless: a release that fails for any reason is
retried with back-off until it lands, the node is gone, or the attempts run out; the lease TTL
on the node is the backstop.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

MAX_ATTEMPTS = 8
_FIRST_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 2.0


Grantor = tuple[str, int]  # (node_id, incarnation): a restarted node holds none of the old leases


class LeaseBook:
    """Per key, the leases this client holds (who granted each, and its id) until the leases'
    TTL: past it the node has let them go, so a record that was never released (an unlock that
    never came) is dropped too, by ``expire``, rather than kept for ever."""

    def __init__(self) -> None:
        self._held: dict[bytes, list[tuple[Grantor, int]]] = {}  # key -> [(grantor, lease id)]
        self._until: dict[bytes, float] = {}  # key -> latest grant's expiry
        self._deadlines: list[tuple[float, bytes]] = []  # heap; stale entries are skipped
        self._lock = threading.Lock()

    def add(self, key: bytes, grantor: Grantor, lease_id: int = 0, until: float = math.inf) -> None:
        self.add_many([(key, grantor, lease_id)], until)

    def add_many(self, grants: Iterable[tuple[bytes, Grantor, int]], until: float = math.inf) -> None:
        """Record one lease per ``(key, (node_id, incarnation), lease id)`` expiring at ``until``
        (monotonic seconds), under one lock acquisition."""
        with self._lock:
            held = self._held
            for key, grantor, lease_id in grants:
                held.setdefault(key, []).append((grantor, lease_id))
                if until > self._until.get(key, -math.inf):
                    self._until[key] = until
                    if until != math.inf:
                        heapq.heappush(self._deadlines, (until, key))

    def expire(self, now: float) -> int:
        """Forget the keys whose every lease has run out its TTL; how many were dropped."""
        dropped = 0
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                until, key = heapq.heappop(self._deadlines)
                if self._until.get(key) == until:  # not renewed since
                    del self._until[key]
                    dropped += len(self._held.pop(key, ()))
        return dropped

    def holders_many(self, keys: Iterable[bytes]) -> list[list[str]]:
        """Per key the nodes holding a lease of it for this client, most leases first."""
        with self._lock:
            out: list[list[str]] = []
            for key in keys:
                leases = self._held.get(key)
                if not leases:
                    out.append([])
                elif len(leases) == 1:
                    out.append([leases[0][0][0]])
                else:
                    counts = Counter(g[0] for g, _ in leases)
                    out.append([n for n, _ in counts.most_common()])
            return out

    def holders(self, key: bytes) -> list[str]:
        return self.holders_many([key])[0]

    def take(self, key: bytes) -> tuple[Grantor, int] | None:
        """Forget one lease of ``key``: (who granted it, its id); None if none is held."""
        return self.take_many([key])[0]

    def take_many(self, keys: Iterable[bytes]) -> list[tuple[Grantor, int] | None]:
        """``take`` for each key, under one lock acquisition."""
        out: list[tuple[Grantor, int] | None] = []
        with self._lock:
            for key in keys:
                leases = self._held.get(key)
                if not leases:
                    out.append(None)
                    continue
                out.append(leases.pop())
                if not leases:
                    del self._held[key]
                    self._until.pop(key, None)
        return out

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._held.values())


@dataclass
class OwedRelease:
    lease_id: int
    node_id: str
    incarnation: int  # a restarted node holds none of its earlier life's leases
    attempts: int = 0
    next_try: float = 0.0


class ReleaseQueue:
    def __init__(self) -> None:
        self._owed: list[OwedRelease] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._owed)

    def owe(self, items: list[OwedRelease], now: float) -> int:
        """Schedule another try of each item; the number dropped for running out of attempts."""
        dropped = 0
        with self._lock:
            for item in items:
                item.attempts += 1
                if item.attempts >= MAX_ATTEMPTS:
                    dropped += 1
                    continue
                item.next_try = now + min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (item.attempts - 1))
                self._owed.append(item)
        return dropped

    def due(self, now: float) -> dict[str, list[OwedRelease]]:
        """Remove and return the items whose time has come, grouped by node."""
        with self._lock:
            ready = [i for i in self._owed if i.next_try <= now]
            self._owed = [i for i in self._owed if i.next_try > now]
        out: dict[str, list[OwedRelease]] = {}
        for item in ready:
            out.setdefault(item.node_id, []).append(item)
        return out
