"""Store: LRU eviction order, leases (refcount + TTL, injected clock), read pins, overwrite, LIST paging."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmcache_memkv.node.arena import ALIGN, Arena
from lmcache_memkv.node.store import Extent, Store
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
        yield Store(arena, clock=clock)
    finally:
        arena.close()


def put(store: Store, key: bytes, data: bytes = b"", size: int = SLOT) -> Status:
    slot = store.reserve(size)
    if not isinstance(slot, Extent):
        return slot
    payload = (data or key).ljust(size, b".")[:size]
    store.arena.view[slot.offset : slot.offset + size] = payload
    store.publish(key, slot)
    return Status.OK


def read(store: Store, key: bytes) -> bytes | None:
    _status, ext = store.pin(key, 1 << 30)
    if ext is None:
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
    assert store.exists([b"a", b"b", b"zz"], lease_ttl_s=30) == [(Status.OK, SLOT), (Status.OK, SLOT), (Status.MISS, 0)]
    put(store, b"e")
    put(store, b"f")
    assert keys(store) == [b"a", b"b", b"e", b"f"]
    assert store.snapshot()["leases"] == 2
    assert store.release([b"a", b"a", b"nope"]) == [Status.OK, Status.NOT_LEASED, Status.NOT_LEASED]
    put(store, b"g")  # "a" is the least recently used and no longer leased
    assert keys(store) == [b"b", b"e", b"f", b"g"]


def test_leases_are_refcounted(store: Store) -> None:
    put(store, b"a")
    store.exists([b"a"], 30)
    store.exists([b"a"], 30)
    assert store.release([b"a"]) == [Status.OK]
    for k in (b"b", b"c", b"d", b"e"):
        put(store, k)
    assert b"a" in keys(store)  # still one lease
    assert store.release([b"a"]) == [Status.OK]
    assert store.snapshot()["leases"] == 0


def test_lease_ttl_expiry(store: Store, clock: Clock) -> None:
    for k in (b"a", b"b", b"c", b"d"):
        put(store, k)
    store.exists([b"a"], lease_ttl_s=5)
    for k in (b"b", b"c", b"d"):
        read(store, k)  # "a" is the least recently used again
    clock.now += 4.9
    put(store, b"e")
    assert keys(store) == [b"a", b"c", b"d", b"e"]  # "a" skipped while leased
    clock.now += 0.2  # past the TTL: the lease no longer protects "a"
    assert store.snapshot()["leases"] == 0
    assert store.release([b"a"]) == [Status.NOT_LEASED]
    put(store, b"f")
    assert keys(store) == [b"c", b"d", b"e", b"f"]
    assert store.snapshot()["leases_expired"] == 1


def test_expired_leases_do_not_pile_up(store: Store, clock: Clock) -> None:
    put(store, b"a")
    for _ in range(1000):
        store.exists([b"a"], lease_ttl_s=1)
        clock.now += 2
    assert store._index[b"a"].leases == 1  # only the last grant: the others were expired at once
    snap = store.snapshot()
    assert (snap["leases"], snap["leases_expired"]) == (0, 1000)


def test_no_space_when_everything_is_leased_or_pinned(store: Store) -> None:
    for k in (b"a", b"b", b"c"):
        put(store, k)
    store.exists([b"a", b"b"], 30)
    status, ext = store.pin(b"c", SLOT)  # a reader in flight
    assert status is Status.OK and ext is not None
    put(store, b"d")
    store.exists([b"d"], 30)
    assert put(store, b"e") is Status.NO_SPACE
    assert b"c" in keys(store)
    store.unpin([ext])
    assert put(store, b"e") is Status.OK  # "c" is evictable once its reader is done
    assert b"c" not in keys(store)
    assert store.snapshot()["no_space"] == 1


def test_too_large(store: Store) -> None:
    assert store.reserve(4 * SLOT + 1) is Status.TOO_LARGE
    assert isinstance(store.reserve(4 * SLOT), Extent)


def test_overwrite_keeps_a_pinned_reader_intact(store: Store) -> None:
    put(store, b"k", b"old")
    _status, old = store.pin(b"k", SLOT)
    assert old is not None
    put(store, b"k", b"new")  # lands in a fresh extent; the old one is retired, not freed
    assert old.retired and store.arena.allocated == 2 * SLOT
    assert bytes(store.arena.view[old.offset : old.offset + 3]) == b"old"
    assert read(store, b"k") == b"new".ljust(SLOT, b".")
    store.unpin([old])  # last reader gone: now it is freed
    assert store.arena.allocated == SLOT
    assert store.snapshot()["value_bytes"] == SLOT


def test_overwrite_is_idempotent_and_keeps_leases(store: Store) -> None:
    put(store, b"k", b"v")
    store.exists([b"k"], 30)
    put(store, b"k", b"v")
    put(store, b"k", b"v")
    assert keys(store) == [b"k"] and store.arena.allocated == SLOT
    assert store.release([b"k"]) == [Status.OK]


def test_delete(store: Store) -> None:
    put(store, b"a")
    put(store, b"b")
    store.exists([b"b"], 30)
    _status, ext = store.pin(b"a", SLOT)
    assert store.delete([b"a", b"b", b"c"]) == [Status.OK, Status.OK, Status.MISS]
    assert keys(store) == []
    assert store.arena.allocated == SLOT  # "a" waits for its reader
    assert ext is not None
    store.unpin([ext])
    assert store.arena.allocated == 0
    snap = store.snapshot()
    assert (snap["value_bytes"], snap["leases"]) == (0, 0)


def test_abort_returns_the_reservation(store: Store) -> None:
    slot = store.reserve(3 * SLOT)
    assert isinstance(slot, Extent)
    store.abort(slot)
    assert store.arena.allocated == 0 and keys(store) == []


def test_pin_capacity_and_hit_counters(store: Store) -> None:
    put(store, b"a", size=100)
    assert store.pin(b"a", 99) == (Status.MISS, None)  # too big for the reader's buffer
    status, ext = store.pin(b"a", 100)
    assert status is Status.OK and ext is not None and ext.length == 100
    store.unpin([ext])
    assert store.pin(b"zz", 100) == (Status.MISS, None)
    snap = store.snapshot()
    assert (snap["hits"], snap["misses"]) == (1, 2)


def test_list_pages_by_prefix_and_cursor() -> None:
    arena = Arena(64 * SLOT)
    try:
        store = Store(arena)
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
