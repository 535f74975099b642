"""Leases this client holds (per key, a multiset of granting nodes) and releases still owed.

A key may be leased several times (LMCache locks per request), on different nodes if the
view changed in between; each release returns one lease, by its id, to the node that granted
it. Releases name lease ids, so a retry is harmless: a release that fails for any reason is
retried with back-off until it lands, the node is gone, or the attempts run out; the lease TTL
on the node is the backstop.
"""

from __future__ import annotations

import heapq
import itertools
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
    """Per key, the leases this client holds (who granted each, its id, its expiry) until each
    lease's TTL: past it the node has let it go, so a record that was never released (an unlock
    that never came) is dropped too, by ``expire``, rather than kept for ever.

    The expiry heap holds one entry per grant batch (``add_many``: one lookup's keys share one
    expiry), not one per key: a lookup of fresh keys, LMCache's common case, costs no heap push
    per key. Released keys leave their references in their batch's entry until it comes due;
    once the references outnumber twice the lease records, the heap is rebuilt from the records,
    so memory follows the leases held, however often the same keys are leased and released.
    """

    _COMPACT_SLACK = 64  # a small heap is not worth rebuilding

    def __init__(self) -> None:
        self._held: dict[bytes, list[tuple[Grantor, int, float]]] = {}  # key -> [(grantor, lease id, until)]
        self._records = 0  # lease records in _held
        self._deadlines: list[tuple[float, int, list[bytes]]] = []  # heap: (until, seq, keys granted then)
        self._refs = 0  # keys referenced by the heap's entries
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def add(self, key: bytes, grantor: Grantor, lease_id: int = 0, until: float = math.inf) -> None:
        self.add_many([(key, grantor, lease_id)], until)

    def add_many(self, grants: Iterable[tuple[bytes, Grantor, int]], until: float = math.inf) -> None:
        """Record one lease per ``(key, (node_id, incarnation), lease id)`` expiring at ``until``
        (monotonic seconds), under one lock acquisition."""
        grants = list(grants)  # evaluated first: a failing generator must leave the book as it was
        with self._lock:
            held = self._held
            keys: list[bytes] = []
            append = keys.append
            for key, grantor, lease_id in grants:
                held.setdefault(key, []).append((grantor, lease_id, until))
                append(key)
            self._records += len(keys)
            if keys and until != math.inf:
                heapq.heappush(self._deadlines, (until, next(self._seq), keys))
                self._refs += len(keys)
                self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the lease records once stale references outnumber them."""
        if self._refs <= 2 * self._records + self._COMPACT_SLACK:
            return
        by_until: dict[float, list[bytes]] = {}
        for key, leases in self._held.items():
            for _, _, until in leases:
                if until != math.inf:
                    by_until.setdefault(until, []).append(key)
        self._deadlines = [(until, next(self._seq), keys) for until, keys in by_until.items()]
        heapq.heapify(self._deadlines)
        self._refs = sum(len(keys) for keys in by_until.values())

    def expire(self, now: float) -> int:
        """Forget the leases that have run out their TTL; how many were dropped."""
        dropped = 0
        with self._lock:
            held = self._held
            due: set[bytes] = set()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, keys = heapq.heappop(self._deadlines)
                self._refs -= len(keys)
                due.update(keys)
            # Each key once, however many due entries name it: a key leased again and again
            # (never unlocked) has one entry per lease, and a long list to filter.
            for key in due:
                leases = held.get(key)
                if not leases:
                    continue  # released since
                live = [lease for lease in leases if lease[2] > now]
                if len(live) == len(leases):
                    continue
                dropped += len(leases) - len(live)
                if live:
                    held[key] = live
                else:
                    del held[key]
            self._records -= dropped
            self._compact()  # entries still due later may reference only keys dropped just now
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
                    counts = Counter(g[0] for g, _, _ in leases)
                    out.append([n for n, _ in counts.most_common()])
            return out

    def holders(self, key: bytes) -> list[str]:
        return self.holders_many([key])[0]

    def take(self, key: bytes) -> tuple[Grantor, int] | None:
        """Forget one lease of ``key``: (who granted it, its id); None if none is held."""
        return self.take_many([key])[0]

    def take_many(self, keys: Iterable[bytes]) -> list[tuple[Grantor, int] | None]:
        """``take`` for each key (its latest lease), under one lock acquisition."""
        out: list[tuple[Grantor, int] | None] = []
        with self._lock:
            for key in keys:
                leases = self._held.get(key)
                if not leases:
                    out.append(None)
                    continue
                grantor, lease_id, _ = leases.pop()
                self._records -= 1
                out.append((grantor, lease_id))
                if not leases:
                    # Its heap reference goes stale; ``_compact`` bounds how many such wait there.
                    del self._held[key]
            self._compact()
        return out

    def count(self) -> int:
        with self._lock:
            return self._records

    def footprint(self) -> tuple[int, int]:
        """(lease records, keys the expiry heap references): what this book holds in memory."""
        with self._lock:
            return sum(len(v) for v in self._held.values()), self._refs


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
