"""Index, versions, LRU order, leases and read pins over the arena.

Writes land in a fresh extent that no reader can see, and are published by swapping the
index entry under the lock, so an overwrite never tears a concurrent read. A reader pins
the extent it found; a retired extent is freed only once its last reader unpins it.

Every value carries its writer's version: a PUT or DELETE older than what the node holds for
the key (a value, or a tombstone left by a delete or an eviction) is refused as STALE, so
replicas converge on the newest write whatever order requests arrive in. A PUT the node cannot
store (no space, too large) drops the older value of its key: the replica then holds nothing
stale, only a miss. The version floor starts at the wall clock when the store starts or is
wiped, so a write issued before then (delayed in a socket, a listen backlog, a retry) cannot
land in the new life; versions far ahead of the node's clock are refused too.

Leases have ids and owners (the client id of the connection that took them), a TTL capped by
the node, and a byte budget per owner and in all. A lease protects the value it was granted
on: an overwrite, delete or invalidation of the key ends it. A leased value is kept off the LRU
list, so eviction is O(1) per victim however many entries are leased.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sortedcontainers import SortedList

from lmcache_memkv.node.arena import ALIGN, Arena, align_up
from lmcache_memkv.versions import FUTURE_SLACK, MAX_VERSION, wall_version
from lmcache_memkv.wire.constants import Status

DEFAULT_MAX_LEASE_TTL_S = 300.0
DEFAULT_MAX_TOMBSTONES = 100_000
MAX_LEASES_PER_OWNER = 1 << 16  # lease records, however few keys: bounds the node's memory
MAX_LEASES = 1 << 20  # lease records, all owners together (owners are ids clients choose)


_MISS = (Status.MISS, 0, 0, 0)


class Fenced(Exception):
    """The store was wiped (the node may have been declared DEAD) while a request was under way."""


@dataclass(slots=True)  # one of each per stored value: small, and quick to make
class Extent:
    offset: int
    length: int
    pins: int = 0
    retired: bool = False


@dataclass(slots=True)
class Entry:
    extent: Extent
    version: int


# A lease record: (key, owner, until in monotonic seconds). Tuples, not objects: EXISTS grants
# one per found key on the hot path of every LMCache lookup.
Lease = tuple[bytes, bytes, float]


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    leases_granted: int = 0
    leases_released: int = 0
    leases_expired: int = 0
    leases_denied: int = 0
    no_space: int = 0
    stale: int = 0
    invalidations: int = 0
    wipes: int = 0


class Store:
    def __init__(
        self,
        arena: Arena,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_lease_ttl_s: float = DEFAULT_MAX_LEASE_TTL_S,
        lease_budget_bytes: int | None = None,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        max_leases_per_owner: int = MAX_LEASES_PER_OWNER,
        wall: Callable[[], int] = wall_version,
    ) -> None:
        """``wall()`` is the node's clock as a version (tests inject one)."""
        self.arena = arena
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self.max_lease_ttl_s = max_lease_ttl_s
        # One client may lease half the arena, all clients together three quarters: at least a
        # quarter always stays evictable for writers. (LMCache's own benchmark holds the locks of
        # every key it looks up until their TTL, so a tighter default starves it.)
        self.lease_budget_bytes = arena.capacity // 2 if lease_budget_bytes is None else lease_budget_bytes
        self.max_leased_bytes = max(self.lease_budget_bytes, arena.capacity * 3 // 4)
        self.max_tombstones = max_tombstones
        self.max_leases_per_owner = max_leases_per_owner
        self.counters = StoreCounters()
        self._lease_ids = itertools.count(secrets.randbits(48) + 1)  # not reused across lives
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        self._index: dict[bytes, Entry] = {}
        # LIST pages in key order. The sorted key list is brought up to date only when a LIST
        # comes: writes just note which keys came or went (a set insert instead of a sorted
        # insert, several microseconds, per value).
        self._sorted: SortedList = SortedList()
        self._changed: set[bytes] | None = set()  # None: too many to replay, sort afresh
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # unleased keys, oldest first
        self._lru_bytes = 0  # arena bytes of the entries on the LRU list
        self._leases: dict[int, Lease] = {}
        # One entry per EXISTS that granted leases: (until, first id, count). The ids one call grants
        # are consecutive (taken under the lock), so its leases expire together; released ids are skipped.
        self._lease_heap: list[tuple[float, int, int]] = []
        # key -> (aligned bytes, ids of its live leases, all owners): a key pins its bytes once
        # however often it is leased. A set, so ending one of a key's many leases (a shared
        # prefix locked by every request) costs the same as ending its only one.
        self._leased_keys: dict[bytes, tuple[int, set[int]]] = {}
        self._owner_keys: dict[bytes, dict[bytes, int]] = {}  # owner -> key -> leases it holds on it
        self._owner_bytes: dict[bytes, int] = {}  # owner -> bytes of the distinct keys it leases
        self._owner_leases: dict[bytes, int] = {}  # owner -> lease records it holds
        self._leased_bytes = 0  # bytes of the distinct leased keys
        self._tombs: OrderedDict[bytes, int] = OrderedDict()  # key -> version it was deleted at
        # Writes at or below the floor are refused: issued before this life began, or covered by a
        # tombstone since dropped.
        self._floor = self._wall()
        self.value_bytes = 0

    # ------------------------------------------------------------------ writes

    def reserve(
        self, key: bytes, size: int, version: int, generation: int, tentative: bool = False
    ) -> Extent | Status | None:
        """An unpublished extent for a value of ``size`` bytes, evicting LRU entries as needed.

        Refused at once, evicting nothing: STALE (the node holds something newer), TOO_LARGE, or
        NO_SPACE when free plus evictable bytes cannot hold it. TOO_LARGE and NO_SPACE drop the
        key's older value, so this replica serves no stale value. ``tentative``: None instead of
        TOO_LARGE or NO_SPACE, the key's value kept (the caller asks again later).
        """
        need = align_up(max(size, 1))
        with self._lock:
            self._check_generation(generation)
            if self._stale(key, version):
                self.counters.stale += 1
                return Status.STALE
            if need > self.arena.capacity:
                return None if tentative else self._refuse_for_space(key, version, Status.TOO_LARGE)
            self._expire_leases(self._clock())
            if self.arena.capacity - self.arena.allocated + self._lru_bytes < need:
                return None if tentative else self._refuse_for_space(key, version, Status.NO_SPACE)
            while True:
                offset = self.arena.alloc(size)
                if offset is not None:
                    return Extent(offset=offset, length=size)
                if not self._evict_one():  # fragmentation around pinned or leased extents
                    return None if tentative else self._refuse_for_space(key, version, Status.NO_SPACE)

    def _refuse_for_space(self, key: bytes, version: int, status: Status) -> Status:
        if status == Status.NO_SPACE:
            self.counters.no_space += 1
        self._invalidate(key, version)
        return status

    def refuse(self, key: bytes, version: int, generation: int) -> Status:
        """Refuse a write that may not be taken now (NOT_READY), dropping the key's older value
        like any refused write; STALE if the node holds something newer anyway."""
        with self._lock:
            self._check_generation(generation)
            if self._stale(key, version):
                self.counters.stale += 1
                return Status.STALE
            self._invalidate(key, version)
            return Status.NOT_READY

    def publish(self, key: bytes, extent: Extent, version: int, generation: int) -> Status:
        """Make ``extent`` the value of ``key`` unless something newer arrived meanwhile (STALE)."""
        with self._lock:
            if generation != self.generation:
                self.arena.free(extent.offset, extent.length)
                raise Fenced("the store was wiped while this value arrived")
            if self._stale(key, version):
                self.counters.stale += 1
                self.arena.free(extent.offset, extent.length)
                return Status.STALE
            self._tombs.pop(key, None)
            old = self._index.get(key)
            if old is not None:
                self._end_leases_of(key)  # a lease protected the value it was granted on
                self._unlist(key, old)
                self.value_bytes -= old.extent.length
                self._retire(old.extent)
            else:
                self._note(key)
            entry = Entry(extent=extent, version=version)
            self._index[key] = entry
            self.value_bytes += extent.length
            self._list(key, entry)
            return Status.OK

    def abort(self, extent: Extent) -> None:
        """Give back an extent that was reserved but never published."""
        with self._lock:
            self.arena.free(extent.offset, extent.length)

    def delete(self, keys: Iterable[bytes], versions: Iterable[int]) -> list[Status]:
        """Delete each key whose value is not newer than the given version; leave a tombstone."""
        out: list[Status] = []
        with self._lock:
            for key, version in zip(keys, versions, strict=True):
                entry = self._index.get(key)
                if (entry is not None and entry.version > version) or version > MAX_VERSION or version > self._wall() + FUTURE_SLACK:
                    out.append(Status.STALE)
                    continue
                if entry is not None:
                    del self._index[key]
                    self._note(key)
                    self._drop(key, entry)
                self._tombstone(key, version)
                out.append(Status.OK if entry is not None else Status.MISS)
        return out

    def wipe(self) -> int:
        """Forget every value, lease and tombstone (the node may have been declared DEAD: a miss is
        safe, a stale hit never is); requests begun before fail with ``Fenced``. The new generation."""
        with self._lock:
            for entry in self._index.values():
                self._retire(entry.extent)  # pinned extents are freed by their last reader
            self._reset()
            self.generation += 1
            self.counters.wipes += 1
            return self.generation

    # ------------------------------------------------------------------ reads

    def pin(self, key: bytes, capacity: int, exact: bool = False) -> tuple[Status, Extent | None, int]:
        """Find ``key`` and pin its extent for reading: (status, extent, version).

        A value over ``capacity`` is a miss; with ``exact`` a value of any other length is
        WRONG_SIZE (its length is reported, nothing is sent).
        """
        with self._lock:
            entry = self._index.get(key)
            if entry is None or (not exact and entry.extent.length > capacity):
                self.counters.misses += 1
                return Status.MISS, None, 0
            if exact and entry.extent.length != capacity:
                self.counters.misses += 1
                return Status.WRONG_SIZE, entry.extent, entry.version
            self.counters.hits += 1
            entry.extent.pins += 1
            if key in self._lru:
                self._lru.move_to_end(key)
            return Status.OK, entry.extent, entry.version

    def unpin(self, extents: Iterable[Extent]) -> None:
        with self._lock:
            for ext in extents:
                ext.pins -= 1
                if ext.retired and ext.pins == 0:
                    self.arena.free(ext.offset, ext.length)

    def exists(self, keys: Iterable[bytes], lease_ttl_s: float, owner: bytes = b"") -> list[tuple[Status, int, int, int]]:
        """Per key (status, length, version, lease id); a positive TTL leases each found key.

        The TTL is capped by the node; a key found beyond the owner's (or the node's) lease
        budget is LEASE_LIMIT: present, but not leased.
        """
        out: list[tuple[Status, int, int, int]] = []
        now = self._clock()
        ttl = min(lease_ttl_s, self.max_lease_ttl_s)
        ok, limited = Status.OK, Status.LEASE_LIMIT  # an enum member costs an attribute lookup a key
        with self._lock:
            index_get = self._index.get
            if ttl <= 0:
                lru = self._lru
                for key in keys:
                    entry = index_get(key)
                    if entry is None:
                        out.append(_MISS)
                        continue
                    if key in lru:
                        lru.move_to_end(key)
                    out.append((ok, entry.extent.length, entry.version, 0))
                return out
            self._expire_leases(now)
            # The hot path of every LMCache lookup: locals, and the owner's figures written back once.
            until = now + ttl
            leases, leased_keys, ids, lru = self._leases, self._leased_keys, self._lease_ids, self._lru
            mine = self._owner_keys.get(owner)
            if mine is None:
                mine = {}
            owner_bytes = self._owner_bytes.get(owner, 0)
            owner_count = self._owner_leases.get(owner, 0)
            leased_bytes, lru_bytes = self._leased_bytes, self._lru_bytes
            budget, max_total, max_own = self.lease_budget_bytes, self.max_leased_bytes, self.max_leases_per_owner
            room = MAX_LEASES - len(leases)  # lease records the node may still hold, all owners
            first = -1
            granted = denied = 0
            append = out.append
            for key in keys:
                entry = index_get(key)
                if entry is None:
                    append(_MISS)
                    continue
                length, version = entry.extent.length, entry.version
                nbytes = (length + ALIGN - 1) // ALIGN * ALIGN or ALIGN
                mine_count = mine.get(key, 0)
                held = leased_keys.get(key)
                if (
                    (not mine_count and owner_bytes + nbytes > budget)
                    or (held is None and leased_bytes + nbytes > max_total)
                    or owner_count >= max_own
                    or granted >= room
                ):
                    denied += 1
                    append((limited, length, version, 0))
                    continue
                lease_id = next(ids)
                if first < 0:
                    first = lease_id
                leases[lease_id] = (key, owner, until)
                owner_count += 1
                mine[key] = mine_count + 1
                if not mine_count:
                    owner_bytes += nbytes
                if held is None:
                    if lru.pop(key, 0) is None:  # off the LRU list while leased
                        lru_bytes -= nbytes
                    leased_keys[key] = (nbytes, {lease_id})
                    leased_bytes += nbytes
                else:
                    held[1].add(lease_id)
                granted += 1
                append((ok, length, version, lease_id))
            self._leased_bytes, self._lru_bytes = leased_bytes, lru_bytes
            if granted:
                self._owner_keys[owner] = mine
                self._owner_leases[owner] = owner_count
                self._owner_bytes[owner] = owner_bytes
                heap = self._lease_heap
                heapq.heappush(heap, (until, first, granted))
                if len(heap) > 2 * len(leases) + 1024:
                    # Released leases leave their batch's entry behind until its TTL: drop the
                    # entries with no live lease now and then, so a lock-then-unlock client cannot
                    # grow the heap.
                    self._lease_heap = [e for e in heap if any(i in leases for i in range(e[1], e[1] + e[2]))]
                    heapq.heapify(self._lease_heap)
            self.counters.leases_granted += granted
            self.counters.leases_denied += denied
        return out

    def release(self, lease_ids: Iterable[int], owner: bytes = b"") -> list[Status]:
        """Release leases by id; an id this owner does not hold (any more) is NOT_LEASED, so a retry is harmless."""
        out: list[Status] = []
        with self._lock:
            for lease_id in lease_ids:
                lease = self._leases.get(lease_id)
                if lease is None or lease[1] != owner:
                    out.append(Status.NOT_LEASED)
                    continue
                self._end_lease(lease_id, lease)
                self.counters.leases_released += 1
                out.append(Status.OK)
        return out

    def list(self, prefix: bytes, cursor: bytes, limit: int) -> tuple[list[tuple[bytes, int]], bytes]:
        """Up to ``limit`` keys with ``prefix`` sorting after ``cursor``, and the next cursor."""
        with self._lock:
            start = max(prefix, cursor)
            items: list[tuple[bytes, int]] = []
            self._sync_sorted()
            for key in self._sorted.irange(minimum=start, inclusive=(cursor == b"" or start != cursor, True)):
                if not key.startswith(prefix):
                    break
                if len(items) == limit:
                    return items, items[-1][0]
                items.append((key, self._index[key].extent.length))
            return items, b""

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            self._expire_leases(self._clock())
            c = self.counters
            return {
                "capacity_bytes": self.arena.capacity,
                "used_bytes": self.arena.allocated,
                "value_bytes": self.value_bytes,
                "keys": len(self._index),
                "leases": len(self._leases),
                "leased_bytes": self._leased_bytes,
                "tombstones": len(self._tombs),
                "hits": c.hits,
                "misses": c.misses,
                "evictions": c.evictions,
                "evicted_bytes": c.evicted_bytes,
                "leases_granted": c.leases_granted,
                "leases_released": c.leases_released,
                "leases_expired": c.leases_expired,
                "leases_denied": c.leases_denied,
                "no_space": c.no_space,
                "stale": c.stale,
                "invalidations": c.invalidations,
                "wipes": c.wipes,
                "generation": self.generation,
            }

    # ------------------------------------------------------------------ internals (lock held)

    def _note(self, key: bytes) -> None:
        """``key`` came into the index or left it: LIST's sorted list must learn of it."""
        changed = self._changed
        if changed is not None:
            changed.add(key)
            if len(changed) > 2 * len(self._index) + 1024:  # no LIST for a long while: stop noting
                self._changed = None

    def _sync_sorted(self) -> None:
        """Bring the sorted key list up to date with the index (for LIST). After much churn
        this sorts every key once, under the lock: LIST is an operator's call, not a data path."""
        changed, self._changed = self._changed, set()
        if changed is None or len(changed) > len(self._sorted) // 2:
            self._sorted = SortedList(self._index)  # one sort beats many inserts
            return
        index, ordered = self._index, self._sorted
        for key in changed:
            if key in index:
                if key not in ordered:
                    ordered.add(key)
            else:
                ordered.discard(key)

    def _check_generation(self, generation: int) -> None:
        if generation != self.generation:
            raise Fenced("the store was wiped since this connection was opened")

    def _stale(self, key: bytes, version: int) -> bool:
        if version <= self._floor or version > MAX_VERSION or version > self._wall() + FUTURE_SLACK:
            return True
        tomb = self._tombs.get(key)
        if tomb is not None and version <= tomb:
            return True
        entry = self._index.get(key)
        return entry is not None and entry.version > version

    def _tombstone(self, key: bytes, version: int) -> None:
        if version <= self._floor:
            return  # the floor already refuses what this tombstone would
        self._tombs[key] = max(version, self._tombs.get(key, 0))
        self._tombs.move_to_end(key)
        while len(self._tombs) > self.max_tombstones:
            _, dropped = self._tombs.popitem(last=False)
            self._floor = max(self._floor, dropped)

    def _invalidate(self, key: bytes, version: int) -> None:
        """A write of ``version`` failed here: drop the older value and refuse anything older later."""
        entry = self._index.get(key)
        if entry is not None and entry.version < version:
            del self._index[key]
            self._note(key)
            self._drop(key, entry)
            self.counters.invalidations += 1
        self._tombstone(key, version - 1)

    def _list(self, key: bytes, entry: Entry) -> None:
        self._lru[key] = None
        self._lru_bytes += align_up(max(entry.extent.length, 1))

    def _unlist(self, key: bytes, entry: Entry) -> None:
        if self._lru.pop(key, 0) is None:
            self._lru_bytes -= align_up(max(entry.extent.length, 1))

    def _end_lease(self, lease_id: int, lease: Lease) -> None:
        del self._leases[lease_id]
        key, owner, _ = lease
        counts = self._owner_leases
        left = counts[owner] - 1
        if left:
            counts[owner] = left
        else:
            del counts[owner]
        nbytes, ids = self._leased_keys[key]  # every lease on a key is on its current value: an overwrite ends them all
        mine = self._owner_keys[owner]
        mine_count = mine[key] - 1
        if mine_count:
            mine[key] = mine_count
        else:
            del mine[key]
            if not mine:
                del self._owner_keys[owner]
            remaining = self._owner_bytes.pop(owner) - nbytes
            if remaining:
                self._owner_bytes[owner] = remaining
        ids.discard(lease_id)
        if ids:
            return
        del self._leased_keys[key]
        self._leased_bytes -= nbytes
        if key in self._index:  # evictable again, newest end: it was just in use
            self._lru[key] = None
            self._lru_bytes += nbytes

    def _end_leases_of(self, key: bytes) -> None:
        held = self._leased_keys.get(key)
        if held is not None:
            for lease_id in list(held[1]):  # a copy: _end_lease edits the set
                self._end_lease(lease_id, self._leases[lease_id])

    def _expire_leases(self, now: float) -> None:
        heap = self._lease_heap
        leases = self._leases
        while heap and heap[0][0] <= now:
            _, first, count = heapq.heappop(heap)
            for lease_id in range(first, first + count):
                lease = leases.get(lease_id)
                if lease is not None:
                    self._end_lease(lease_id, lease)
                    self.counters.leases_expired += 1

    def _evict_one(self) -> bool:
        """Drop the least recently used unleased entry that no reader has pinned.

        Leased keys are not on the list; pinned ones are skipped, and there are only as many of
        those as reads in flight.
        """
        for key in self._lru:
            entry = self._index[key]
            if entry.extent.pins:
                continue
            del self._index[key]
            self._note(key)
            self._drop(key, entry)
            self._tombstone(key, entry.version)  # a delayed older write must not revive what was evicted
            self.counters.evictions += 1
            self.counters.evicted_bytes += entry.extent.length
            return True
        return False

    def _drop(self, key: bytes, entry: Entry) -> None:
        self._end_leases_of(key)
        self._unlist(key, entry)
        self.value_bytes -= entry.extent.length
        self._retire(entry.extent)

    def _retire(self, extent: Extent) -> None:
        extent.retired = True
        if extent.pins == 0:
            self.arena.free(extent.offset, extent.length)
