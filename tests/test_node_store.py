"""Store: LRU eviction order, leases (ids, owners, TTL, budgets; injected clock), versions, read pins, LIST paging."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.node.arena import ALIGN, Arena
from lmcache_memkv.node.store import Extent, Fenced, Store
from lmcache_memkv.wire.constants import Status

SLOT = ALIGN  # one value = one arena slot keeps the arithmetic obvious


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Iterator[Store]:
    arena = Arena(4 * SLOT)
    try:
        yield Store(arena, wall=lambda: 0, clock=clock, lease_budget_bytes=4 * SLOT)
    finally:
        arena.close()


_VERSIONS = itertools.count(1)


def put(store: Store, key: bytes, data: bytes = b"", size: int = SLOT, version: int | None = None) -> Status:
    version = next(_VERSIONS) if version is None else version
    slot = store.reserve(key, size, version, store.generation)
    if not isinstance(slot, Extent):
        return slot
    payload = (data or key).ljust(size, b".")[:size]
    store.arena.view[slot.offset : slot.offset + size] = payload
    return store.publish(key, slot, version, store.generation)


def lease(store: Store, key: bytes, ttl: float = 30, owner: bytes = b"me") -> int:
    """Lease ``key``; its lease id (0: not leased)."""
    return store.exists([key], ttl, owner)[0][3]


def read(store: Store, key: bytes) -> bytes | None:
    status, ext, _version = store.pin(key, 1 << 30)
    if status is not Status.OK or ext is None:
        return None
    try:
        return bytes(store.arena.view[ext.offset : ext.offset + ext.length])
    finally:
        store.unpin([ext])


def keys(store: Store) -> list[bytes]:
    return [k for k, _ in store.list(b"", b"", 100)[0]]


def test_evicts_least_recently_used_first(store: Store) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        assert put(store, k) is Status.OK
    assert read(store, b"a") is not None  # a GET makes "a" recent
    store.exists([b"b"], 0)  # so does EXISTS
    assert put(store, b"e") is Status.OK
    assert keys(store) == [b"a", b"b", b"d", b"e"]  # "c" was the oldest untouched
    assert put(store, b"f") is Status.OK
    assert keys(store) == [b"a", b"b", b"e", b"f"]
    snap = store.snapshot()
    assert (snap["evictions"], snap["evicted_bytes"], snap["keys"]) == (2, 2 * SLOT, 4)


def test_leased_entries_are_spared_until_released(store: Store) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k)
    found = store.exists([b"a", b"b", b"zz"], 30, b"me")
    assert [f[:2] for f in found] == [(Status.OK, SLOT), (Status.OK, SLOT), (Status.MISS, 0)]
    id_a, id_b = found[0][3], found[1][3]
    assert id_a and id_b and id_a != id_b and found[2][3] == 0
    put(store, b"e")
    put(store, b"f")
    assert keys(store) == [b"a", b"b", b"e", b"f"]
    assert store.snapshot()["leases"] == 2
    assert store.release([id_a, id_a, 12345], b"me") == [Status.OK, Status.NOT_LEASED, Status.NOT_LEASED]
    put(store, b"g")  # a released key re-enters the LRU list as just used: "e" is the oldest now
    assert keys(store) == [b"a", b"b", b"f", b"g"]


def test_leases_count_per_grant(store: Store) -> None:
    put(store, b"a")
    first, second = lease(store, b"a"), lease(store, b"a")
    assert store.release([first], b"me") == [Status.OK]
    for k in (b"b", b"c", b"d", b"e"):
        put(store, k)
    assert b"a" in keys(store)  # still one lease
    assert store.release([second], b"me") == [Status.OK]
    assert store.snapshot()["leases"] == 0


def test_only_the_holder_releases_and_a_retry_is_harmless(store: Store) -> None:
    put(store, b"a")
    mine = lease(store, b"a", owner=b"me")
    assert store.release([mine], b"someone else") == [Status.NOT_LEASED]  # not theirs to release
    assert store.snapshot()["leases"] == 1
    assert store.release([mine], b"me") == [Status.OK]
    assert store.release([mine], b"me") == [Status.NOT_LEASED]  # a retried release changes nothing
    other = lease(store, b"a", owner=b"other")
    assert store.release([mine], b"me") == [Status.NOT_LEASED]  # ... and cannot drop another's lease
    assert store.snapshot()["leases"] == 1 and other


def test_lease_ttl_expiry(store: Store, clock: Clock) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k)
    lid = lease(store, b"a", ttl=5)
    for k in (b"b", b"c", b"d"):
        read(store, k)  # "a" is the least recently used again
    clock.now += 4.9
    put(store, b"e")
    assert keys(store) == [b"a", b"c", b"d", b"e"]  # "a" skipped while leased
    clock.now += 0.2  # past the TTL: the lease no longer protects "a"
    assert store.snapshot()["leases"] == 0
    assert store.release([lid], b"me") == [Status.NOT_LEASED]
    put(store, b"f")  # "a" is back on the LRU list (as just used), so the oldest other goes
    assert keys(store) == [b"a", b"d", b"e", b"f"]
    assert store.snapshot()["leases_expired"] == 1


def test_expired_leases_do_not_pile_up(store: Store, clock: Clock) -> None:
    put(store, b"a")
    for _ in range(1000):
        lease(store, b"a", ttl=1)
        clock.now += 2
    assert len(store._leases) == 1 and len(store._lease_heap) <= 2  # the others were expired at once
    snap = store.snapshot()
    assert (snap["leases"], snap["leases_expired"]) == (0, 1000)


def test_node_caps_the_lease_ttl(clock: Clock) -> None:
    """A client asking for 49 days gets the node's cap (here 60 s), not 49 days."""
    arena = Arena(4 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock, max_lease_ttl_s=60)
        put(store, b"a")
        lid = lease(store, b"a", ttl=49 * 86400, owner=b"hog")
        assert lid
        clock.now += 60.1
        assert store.snapshot()["leases"] == 0
        assert store.release([lid], b"hog") == [Status.NOT_LEASED]
    finally:
        arena.close()


def test_a_lease_hog_cannot_pin_the_arena(clock: Clock) -> None:
    """One client may hold at most its budget leased (default half the arena), so writers always
    find room; past it a found key answers LEASE_LIMIT and is not leased."""
    arena = Arena(16 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock)
        assert store.lease_budget_bytes == 8 * SLOT
        for i in range(16):
            put(store, b"k%02d" % i)
        got = store.exists([b"k%02d" % i for i in range(16)], 3600, b"hog")
        assert [g[0] for g in got].count(Status.OK) == 8
        assert {g[0] for g in got[8:]} == {Status.LEASE_LIMIT} and all(g[3] == 0 for g in got[8:])
        for i in range(16, 28):  # writers still get room: the other 8 slots stay evictable
            assert put(store, b"k%02d" % i) is Status.OK
        assert store.snapshot()["leases_denied"] == 8
        # Another client has a budget of its own.
        assert lease(store, b"k27", owner=b"reader")
    finally:
        arena.close()


def test_a_key_leased_again_pins_its_bytes_once(clock: Clock) -> None:
    """LMCache locks a chunk on every lookup: re-leasing a key costs the budget nothing more, but
    every lease is a record, and one owner's records are capped so its memory cannot grow."""
    arena = Arena(16 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock, max_leases_per_owner=10)
        for i in range(4):
            put(store, b"k%d" % i)
        for _ in range(2):
            assert all(g[3] for g in store.exists([b"k0", b"k1", b"k2", b"k3"], 30, b"me"))  # 4 slots: the budget
        assert store.snapshot()["leased_bytes"] == 4 * SLOT and store.snapshot()["leases"] == 8
        assert [g[0] for g in store.exists([b"k0", b"k1", b"k2"], 30, b"me")] == [Status.OK, Status.OK, Status.LEASE_LIMIT]
        assert store.snapshot()["leases"] == 10
    finally:
        arena.close()


class _CountedId(int):
    """A lease id that counts how often it is compared for equality with another lease id."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _CountedId):
            _CountedId.compared += 1
        return int(self) == other

    __hash__ = int.__hash__


def test_ending_one_of_a_keys_many_leases_does_not_scan_the_others(clock: Clock) -> None:
    """A shared prefix is locked by every request that reads it: one key, thousands of leases.
    Releasing (latest first, as clients do), expiring or overwriting them must not compare each
    lease with all the others under the store's lock (65,536 releases of one key held the lock
    for 12 s before). Counted, not timed: lease ids that count their comparisons."""
    n = 2000
    assert SLOT < 3 * n  # some lease id below equals the key's byte count
    arena = Arena(4 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock, max_leases_per_owner=3 * n)
        put(store, b"prefix")
        store._lease_ids = (_CountedId(i) for i in itertools.count(1))
        _CountedId.compared = 0
        ids = [g[3] for g in store.exists([b"prefix"] * n, 30, b"me")]
        assert all(ids) and store.snapshot()["leases"] == n
        assert store.release(ids[::-1], b"me") == [Status.OK] * n
        assert _CountedId.compared < n  # a scan per release: about n * n / 2 = 2,000,000
        store.exists([b"prefix"] * n, 30, b"me")
        clock.now += 31
        store.exists([b"other"], 0, b"me")  # expires them
        store.exists([b"prefix"] * n, 30, b"me")
        assert put(store, b"prefix") is Status.OK  # an overwrite ends its leases
        # Ids run through 1..3n here, past the key's byte count: the old layout, [bytes, id, ...],
        # removed that count instead of the lease whose id equalled it, and leaked the budget.
        assert store.snapshot()["leases"] == 0 and store.snapshot()["leased_bytes"] == 0
        assert _CountedId.compared < 3 * n
    finally:
        arena.close()


def test_eviction_skips_leased_entries_in_constant_time(clock: Clock) -> None:
    """100k leased entries are off the LRU list: a write that must evict still answers at once
    (the old store scanned every leased entry under its lock for every victim)."""
    n = 100_000
    arena = Arena((n + 64) * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock, lease_budget_bytes=arena.capacity, max_leases_per_owner=n)
        for i in range(n):
            put(store, b"leased/%06d" % i)
        keys_ = [b"leased/%06d" % i for i in range(n)]
        got = store.exists(keys_, 3600, b"reader")
        assert all(g[0] is Status.OK for g in got)
        for i in range(64):
            put(store, b"free/%02d" % i)
        started = time.perf_counter()
        for i in range(64):  # each of these evicts one unleased entry
            assert put(store, b"new/%02d" % i) is Status.OK
        took = time.perf_counter() - started
        assert store.snapshot()["evictions"] == 64
        assert took < 0.5, f"64 evicting writes took {took:.3f}s with {n} leased entries"
    finally:
        arena.close()


def test_no_space_when_everything_is_leased_or_pinned(store: Store) -> None:
    for k in (b"a", b"b", b"c"):
        put(store, k)
    store.exists([b"a", b"b"], 30, b"me")
    status, ext, _v = store.pin(b"c", SLOT)  # a reader in flight
    assert status is Status.OK and ext is not None
    put(store, b"d")
    lease(store, b"d")
    assert put(store, b"e") is Status.NO_SPACE
    assert b"c" in keys(store)
    store.unpin([ext])
    assert put(store, b"e") is Status.OK  # "c" is evictable once its reader is done
    assert b"c" not in keys(store)
    assert store.snapshot()["no_space"] == 1


def test_a_value_that_cannot_fit_fails_at_once_and_evicts_nothing(store: Store) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k)
    lease(store, b"a")
    lease(store, b"b")
    # Two slots are evictable: a three-slot value cannot fit, so nothing is evicted for it.
    assert put(store, b"big", size=3 * SLOT) is Status.NO_SPACE
    assert keys(store) == [b"a", b"b", b"c", b"d"]
    assert store.snapshot()["evictions"] == 0
    assert put(store, b"fits", size=2 * SLOT) is Status.OK  # two slots can be made


def test_too_large(store: Store) -> None:
    assert store.reserve(b"k", 4 * SLOT + 1, 1, 0) is Status.TOO_LARGE
    assert isinstance(store.reserve(b"k", 4 * SLOT, 2, 0), Extent)


def test_overwrite_keeps_a_pinned_reader_intact(store: Store) -> None:
    put(store, b"k", b"old")
    _status, old, _v = store.pin(b"k", SLOT)
    assert old is not None
    put(store, b"k", b"new")  # lands in a fresh extent; the old one is retired, not freed
    assert old.retired and store.arena.allocated == 2 * SLOT
    assert bytes(store.arena.view[old.offset : old.offset + 3]) == b"old"
    assert read(store, b"k") == b"new".ljust(SLOT, b".")
    store.unpin([old])  # last reader gone: now it is freed
    assert store.arena.allocated == SLOT
    assert store.snapshot()["value_bytes"] == SLOT


def test_overwrite_is_idempotent_and_ends_the_old_values_leases(store: Store) -> None:
    """A lease protects the value it was granted on: an overwrite (of any size) ends it, so no
    client can lease a small value and grow it into a pinned big one."""
    put(store, b"k", b"v")
    lid = lease(store, b"k")
    assert store.snapshot()["leased_bytes"] == SLOT
    put(store, b"k", b"v")
    put(store, b"k", b"v", size=2 * SLOT)
    assert keys(store) == [b"k"] and store.arena.allocated == 2 * SLOT
    assert store.snapshot()["leased_bytes"] == 0 and store.snapshot()["leases"] == 0
    assert store.release([lid], b"me") == [Status.NOT_LEASED]
    for k in (b"a", b"b", b"c", b"d"):  # the new value is evictable like any other
        put(store, k)
    assert b"k" not in keys(store)


def test_delete_and_invalidation_end_leases_and_free_the_budget(store: Store) -> None:
    put(store, b"a", version=5)
    put(store, b"b", version=5)
    lease(store, b"a")
    lease(store, b"b")
    assert store.snapshot()["leased_bytes"] == 2 * SLOT
    store.delete([b"a"], [6])
    assert store.reserve(b"b", 5 * SLOT, 6, store.generation) is Status.TOO_LARGE  # drops "b"
    snap = store.snapshot()
    assert (snap["leases"], snap["leased_bytes"], snap["keys"]) == (0, 0, 0)


def test_version_floor_starts_at_the_wall_clock_of_each_life(clock: Clock) -> None:
    """Writes issued before the store started, or before a wipe, cannot land in this life."""
    wall = [1000]
    arena = Arena(4 * SLOT)
    try:
        store = Store(arena, clock=clock, wall=lambda: wall[0])
        assert put(store, b"k", version=999) is Status.STALE
        assert put(store, b"k", version=1001) is Status.OK
        wall[0] = 5000
        store.wipe()
        assert put(store, b"k", version=4000) is Status.STALE  # issued before the wipe
        assert put(store, b"k", version=5001) is Status.OK
    finally:
        arena.close()


def test_versions_far_in_the_future_are_refused(store: Store) -> None:
    """A client cannot push a key, or the node's floor, beyond every later writer's reach."""
    from lmcache_memkv.versions import FUTURE_SLACK, MAX_VERSION

    assert put(store, b"k", version=FUTURE_SLACK + 1) is Status.STALE
    assert put(store, b"k", version=MAX_VERSION + 5) is Status.STALE
    assert store.delete([b"k"], [2**64 - 1]) == [Status.STALE]
    assert put(store, b"k", version=FUTURE_SLACK) is Status.OK


def test_a_write_refused_as_not_ready_drops_the_older_value(store: Store) -> None:
    put(store, b"k", version=10)
    assert store.refuse(b"k", 11, store.generation) is Status.NOT_READY
    assert read(store, b"k") is None
    assert store.refuse(b"k", 9, store.generation) is Status.STALE
    assert put(store, b"k", version=11) is Status.OK  # the same write, once ready


def test_an_evicted_value_leaves_a_tombstone(store: Store) -> None:
    """Eviction remembers the version, so a delayed older write cannot revive the key."""
    put(store, b"old", version=100)
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k)
    assert b"old" not in keys(store)
    assert put(store, b"old", version=99) is Status.STALE
    assert put(store, b"old", version=101) is Status.OK


def test_lock_then_unlock_churn_keeps_the_lease_heap_small(store: Store) -> None:
    put(store, b"a")
    for _ in range(5000):
        store.release([lease(store, b"a", ttl=300)], b"me")
    assert len(store._leases) == 0 and len(store._lease_heap) <= 1024 + 1


def test_older_writes_and_deletes_are_stale(store: Store) -> None:
    """Whatever order they arrive in, a replica keeps the newest version of a key."""
    assert put(store, b"k", b"new", version=20) is Status.OK
    assert put(store, b"k", b"old", version=10) is Status.STALE  # e.g. a delayed or retried write
    assert read(store, b"k") == b"new".ljust(SLOT, b".")
    assert put(store, b"k", b"same", version=20) is Status.OK  # the same write again: idempotent
    assert store.delete([b"k"], [15]) == [Status.STALE]  # an older delete loses to a newer write
    assert read(store, b"k") == b"same".ljust(SLOT, b".")
    assert store.delete([b"k"], [30]) == [Status.OK]
    assert put(store, b"k", b"late", version=25) is Status.STALE  # the tombstone keeps it deleted
    assert read(store, b"k") is None
    assert put(store, b"k", b"newer", version=31) is Status.OK
    assert store.snapshot()["stale"] == 2 and store.snapshot()["tombstones"] == 0


def test_a_refused_write_drops_the_older_value(store: Store) -> None:
    """NO_SPACE and TOO_LARGE leave no stale value behind: the replica holds nothing older."""
    put(store, b"k", b"v1", version=5)
    assert store.reserve(b"k", 5 * SLOT, 6, 0) is Status.TOO_LARGE
    assert read(store, b"k") is None
    assert put(store, b"k", b"v0", version=4) is Status.STALE  # nor can the old version come back
    put(store, b"k", b"v2", version=7)
    for k in (b"a", b"b", b"c"):
        put(store, k)
        lease(store, k)
    lease(store, b"k")
    assert put(store, b"k", b"v3", size=2 * SLOT, version=8) is Status.NO_SPACE
    assert read(store, b"k") is None
    assert store.snapshot()["invalidations"] == 2


def test_tombstones_are_bounded_by_a_version_floor(clock: Clock) -> None:
    arena = Arena(4 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0, clock=clock, max_tombstones=3)
        assert store.delete([b"a", b"b", b"c", b"d"], [10, 11, 12, 13]) == [Status.MISS] * 4
        assert store.snapshot()["tombstones"] == 3
        # "a"'s tombstone was dropped; the floor (its version) still refuses what it refused.
        assert put(store, b"a", version=10) is Status.STALE
        assert put(store, b"zz", version=9) is Status.STALE
        assert put(store, b"a", version=14) is Status.OK
    finally:
        arena.close()


def test_wipe_forgets_everything_and_fences_writes_in_flight(store: Store) -> None:
    put(store, b"a", version=5)
    lid = lease(store, b"a")
    store.delete([b"gone"], [9])
    generation = store.generation
    slot = store.reserve(b"b", SLOT, 10, generation)
    assert isinstance(slot, Extent)
    status, ext, _v = store.pin(b"a", SLOT)
    assert status is Status.OK and ext is not None
    assert store.wipe() == generation + 1
    with pytest.raises(Fenced):
        store.publish(b"b", slot, 10, generation)  # begun before the wipe: refused
    with pytest.raises(Fenced):
        store.reserve(b"c", SLOT, 11, generation)
    assert keys(store) == [] and read(store, b"a") is None
    assert store.release([lid], b"me") == [Status.NOT_LEASED]
    assert store.arena.allocated == SLOT  # the pinned extent waits for its reader
    store.unpin([ext])
    assert store.arena.allocated == 0
    assert put(store, b"gone", version=1) is Status.OK  # a new life: old tombstones are gone too
    assert store.snapshot()["wipes"] == 1


def test_delete(store: Store) -> None:
    put(store, b"a")
    put(store, b"b")
    lease(store, b"b")
    _status, ext, _v = store.pin(b"a", SLOT)
    assert store.delete([b"a", b"b", b"c"], [1 << 40] * 3) == [Status.OK, Status.OK, Status.MISS]
    assert keys(store) == []
    assert store.arena.allocated == SLOT  # "a" waits for its reader
    assert ext is not None
    store.unpin([ext])
    assert store.arena.allocated == 0
    snap = store.snapshot()
    assert snap["value_bytes"] == 0


def test_abort_returns_the_reservation(store: Store) -> None:
    slot = store.reserve(b"k", 3 * SLOT, 1, 0)
    assert isinstance(slot, Extent)
    store.abort(slot)
    assert store.arena.allocated == 0 and keys(store) == []


def test_pin_capacity_and_hit_counters(store: Store) -> None:
    put(store, b"a", size=100)
    assert store.pin(b"a", 99) == (Status.MISS, None, 0)  # too big for the reader's buffer
    status, ext, version = store.pin(b"a", 100)
    assert status is Status.OK and ext is not None and ext.length == 100 and version
    store.unpin([ext])
    assert store.pin(b"zz", 100) == (Status.MISS, None, 0)
    status, ext, _v = store.pin(b"a", 101, exact=True)  # exact: another size is WRONG_SIZE, not pinned
    assert status is Status.WRONG_SIZE and ext is not None and ext.length == 100 and ext.pins == 0
    snap = store.snapshot()
    assert (snap["hits"], snap["misses"]) == (1, 3)


def test_list_pages_by_prefix_and_cursor() -> None:
    arena = Arena(64 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0)
        for k in [b"a1", b"b1", b"b2", b"b3", b"b4", b"b5", b"c1"]:
            put(store, k, size=10)
        assert store.list(b"b", b"", 2) == ([(b"b1", 10), (b"b2", 10)], b"b2")
        assert store.list(b"b", b"b2", 2) == ([(b"b3", 10), (b"b4", 10)], b"b4")
        assert store.list(b"b", b"b4", 2) == ([(b"b5", 10)], b"")
        assert store.list(b"b", b"", 5) == ([(b"b1", 10), (b"b2", 10), (b"b3", 10), (b"b4", 10), (b"b5", 10)], b"")
        assert store.list(b"", b"", 100)[0][0] == (b"a1", 10)
        assert store.list(b"b", b"a", 1) == ([(b"b1", 10)], b"b1")  # a cursor before the prefix
        assert store.list(b"z", b"", 10) == ([], b"")
    finally:
        arena.close()


@given(st.lists(st.tuples(st.sampled_from(["put", "delete", "list"]), st.binary(min_size=1, max_size=2)), max_size=120))
def test_list_sees_every_write_and_delete_in_order(ops: list[tuple[str, bytes]]) -> None:
    arena = Arena(256 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0)
        live: set[bytes] = set()
        for op, key in ops:
            if op == "put":
                assert put(store, key, size=3) == Status.OK
                live.add(key)
            elif op == "delete":
                store.delete([key], [next(_VERSIONS)])
                live.discard(key)
            else:
                prefix = key[:1]
                want = sorted(k for k in live if k.startswith(prefix))
                assert store.list(prefix, b"", 1000) == ([(k, 3) for k in want], b"")
        assert [k for k, _ in store.list(b"", b"", 1000)[0]] == sorted(live)
    finally:
        arena.close()


def test_list_after_more_churn_than_it_tracks() -> None:
    arena = Arena(1024 * SLOT)
    try:
        store = Store(arena, wall=lambda: 0)
        assert store.list(b"", b"", 10) == ([], b"")
        for i in range(3000):  # far more keys come and go than the store has
            key = f"k{i:05d}".encode()
            put(store, key, size=1)
            if i % 7:
                store.delete([key], [next(_VERSIONS)])
        assert store._changed is None  # stopped noting; the next LIST sorts afresh
        want = [f"k{i:05d}".encode() for i in range(3000) if not i % 7]
        assert [k for k, _ in store.list(b"k", b"", 1000)[0]] == want
        put(store, b"k0", size=1)
        assert store.list(b"k0", b"", 2) == ([(b"k0", 1), (b"k00000", 1)], b"k00000")
    finally:
        arena.close()
