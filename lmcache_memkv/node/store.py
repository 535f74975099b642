"""Index, LRU order, leases and read pins over the arena.

Writes land in a fresh extent that no reader can see, and are published by swapping the
index entry under the lock, so an overwrite never tears a concurrent read. A reader pins
the extent it found; a retired extent is freed only once its last reader unpins it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sortedcontainers import SortedDict

from lmcache_memkv.node.arena import Arena, align_up
from lmcache_memkv.wire.constants import Status


@dataclass
class Extent:
    offset: int
    length: int
    pins: int = 0
    retired: bool = False


@dataclass
class Entry:
    """A published value and its leases: a refcount that lives until the latest grant's TTL.

    One count and one deadline (not a deadline per lease) keep every lease operation O(1)
    however often a key is leased without release; a lease may so outlive its own TTL by as
    much as a later lease of the same key, never expire early.
    """

    extent: Extent
    leases: int = 0
    lease_until: float = 0.0  # monotonic seconds


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    leases_granted: int = 0
    leases_released: int = 0
    leases_expired: int = 0
    no_space: int = 0


class Store:
    def __init__(self, arena: Arena, clock: Callable[[], float] = time.monotonic) -> None:
        self.arena = arena
        self._clock = clock
        self._lock = threading.Lock()
        self._index: SortedDict = SortedDict()  # bytes -> Entry, sorted for LIST paging
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._leased: set[bytes] = set()
        self.counters = StoreCounters()
        self.value_bytes = 0

    # ------------------------------------------------------------------ writes

    def reserve(self, size: int) -> Extent | Status:
        """An unpublished extent for a value of ``size`` bytes, evicting LRU entries as needed."""
        if align_up(size) > self.arena.capacity:
            return Status.TOO_LARGE
        with self._lock:
            while True:
                offset = self.arena.alloc(size)
                if offset is not None:
                    return Extent(offset=offset, length=size)
                if not self._evict_one():
                    self.counters.no_space += 1
                    return Status.NO_SPACE

    def publish(self, key: bytes, extent: Extent) -> None:
        """Make ``extent`` the value of ``key``; the old value is retired (idempotent overwrite)."""
        with self._lock:
            old = self._index.get(key)
            entry = Entry(extent=extent)
            if old is not None:
                # A lease protects the key, whichever value it holds.
                entry.leases, entry.lease_until = old.leases, old.lease_until
                self.value_bytes -= old.extent.length
                self._retire(old.extent)
            self._index[key] = entry
            self._lru[key] = None
            self._lru.move_to_end(key)
            self.value_bytes += extent.length

    def abort(self, extent: Extent) -> None:
        """Give back an extent that was reserved but never published."""
        with self._lock:
            self.arena.free(extent.offset, extent.length)

    # ------------------------------------------------------------------ reads

    def pin(self, key: bytes, capacity: int) -> tuple[Status, Extent | None]:
        """Find ``key`` and pin its extent for reading; a value over ``capacity`` is a miss."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.extent.length > capacity:
                self.counters.misses += 1
                return Status.MISS, None
            self.counters.hits += 1
            entry.extent.pins += 1
            self._lru.move_to_end(key)
            return Status.OK, entry.extent

    def unpin(self, extents: Iterable[Extent]) -> None:
        with self._lock:
            for ext in extents:
                ext.pins -= 1
                if ext.retired and ext.pins == 0:
                    self.arena.free(ext.offset, ext.length)

    def exists(self, keys: Iterable[bytes], lease_ttl_s: float) -> list[tuple[Status, int]]:
        out: list[tuple[Status, int]] = []
        now = self._clock()
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is None:
                    out.append((Status.MISS, 0))
                    continue
                if lease_ttl_s > 0:
                    self._live_leases(key, entry, now)  # expired leases do not count towards the new one
                    entry.leases += 1
                    entry.lease_until = max(entry.lease_until, now + lease_ttl_s)
                    self._leased.add(key)
                    self.counters.leases_granted += 1
                self._lru.move_to_end(key)
                out.append((Status.OK, entry.extent.length))
        return out

    def release(self, keys: Iterable[bytes]) -> list[Status]:
        out: list[Status] = []
        now = self._clock()
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is None or not self._live_leases(key, entry, now):
                    out.append(Status.NOT_LEASED)
                    continue
                entry.leases -= 1
                self.counters.leases_released += 1
                if not entry.leases:
                    self._leased.discard(key)
                out.append(Status.OK)
        return out

    def delete(self, keys: Iterable[bytes]) -> list[Status]:
        out: list[Status] = []
        with self._lock:
            for key in keys:
                entry = self._index.pop(key, None)
                if entry is None:
                    out.append(Status.MISS)
                    continue
                self._drop(key, entry)
                out.append(Status.OK)
        return out

    def list(self, prefix: bytes, cursor: bytes, limit: int) -> tuple[list[tuple[bytes, int]], bytes]:
        """Up to ``limit`` keys with ``prefix`` sorting after ``cursor``, and the next cursor."""
        with self._lock:
            start = max(prefix, cursor)
            items: list[tuple[bytes, int]] = []
            for key in self._index.irange(minimum=start, inclusive=(cursor == b"" or start != cursor, True)):
                if not key.startswith(prefix):
                    break
                if len(items) == limit:
                    return items, items[-1][0]
                items.append((key, self._index[key].extent.length))
            return items, b""

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, int]:
        now = self._clock()
        with self._lock:
            leases = sum(self._live_leases(k, self._index[k], now) for k in list(self._leased) if k in self._index)
            c = self.counters
            return {
                "capacity_bytes": self.arena.capacity,
                "used_bytes": self.arena.allocated,
                "value_bytes": self.value_bytes,
                "keys": len(self._index),
                "leases": leases,
                "hits": c.hits,
                "misses": c.misses,
                "evictions": c.evictions,
                "evicted_bytes": c.evicted_bytes,
                "leases_granted": c.leases_granted,
                "leases_released": c.leases_released,
                "leases_expired": c.leases_expired,
                "no_space": c.no_space,
            }

    # ------------------------------------------------------------------ internals (lock held)

    def _live_leases(self, key: bytes, entry: Entry, now: float) -> int:
        if entry.leases and entry.lease_until <= now:
            self.counters.leases_expired += entry.leases
            entry.leases = 0
        if not entry.leases:
            self._leased.discard(key)
        return entry.leases

    def _evict_one(self) -> bool:
        """Drop the least recently used entry that is neither leased nor being read."""
        now = self._clock()
        for key in self._lru:
            entry = self._index[key]
            if entry.extent.pins or self._live_leases(key, entry, now):
                continue
            del self._index[key]
            self._drop(key, entry)
            self.counters.evictions += 1
            self.counters.evicted_bytes += entry.extent.length
            return True
        return False

    def _drop(self, key: bytes, entry: Entry) -> None:
        self._lru.pop(key, None)
        self._leased.discard(key)
        self.value_bytes -= entry.extent.length
        self._retire(entry.extent)

    def _retire(self, extent: Extent) -> None:
        extent.retired = True
        if extent.pins == 0:
            self.arena.free(extent.offset, extent.length)
