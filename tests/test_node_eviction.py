"""Capacity pressure on a real node: LRU eviction that spares leased entries, lease TTL expiry, metrics."""

from __future__ import annotations

import time

from nodeproc import NodeFactory

from lmcache_memkv.client import NodeClient
from lmcache_memkv.wire.constants import Status

MiB = 1 << 20


def present(c: NodeClient) -> list[bytes]:
    """Keys on the node; LIST, unlike EXISTS and GET, does not refresh LRU order."""
    return [k for k, _ in c.iter_keys()]


def test_lru_eviction_spares_leased_entries(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="8MiB", args=["--lease-budget", "8MiB"])  # eight 1 MiB values, all leasable
    value = b"v" * MiB
    with node.client() as c:
        keys = [f"k{i}".encode() for i in range(10)]
        assert c.put(keys[:6], [value] * 6) == [Status.OK] * 6
        leased = c.lookup(keys[:2], lease_ttl_s=60)  # k0, k1 leased
        assert list(leased.lengths) == [MiB, MiB] and all(leased.lease_ids)
        assert c.get_into([keys[2]], [bytearray(MiB)]) == [MiB]  # k2 recently used
        # LRU order now k3 k4 k5 k0 k1 k2; the first two puts fit, the next two evict k3, k4.
        assert c.put(keys[6:10], [value] * 4) == [Status.OK] * 4
        assert present(c) == [keys[i] for i in (0, 1, 2, 5, 6, 7, 8, 9)]
        assert node.metric("memkv_node_evictions_total") == 2
        assert node.metric("memkv_node_evicted_bytes_total") == 2 * MiB
        assert node.metric("memkv_node_leases") == 2

        # More pressure: the leased keys survive, all others make room.
        more = [f"m{i}".encode() for i in range(6)]
        assert c.put(more, [value] * 6) == [Status.OK] * 6
        assert present(c) == [keys[0], keys[1], *more]
        # With every entry leased, nothing can make room.
        c.exists(more, lease_ttl_s=60)
        assert c.put([b"no-room"], [value]) == [Status.NO_SPACE]
        assert c.put([b"too-big"], [b"x" * (9 * MiB)]) == [Status.TOO_LARGE]
        assert node.metric("memkv_node_no_space_total") == 1

        # Releasing a lease makes that key evictable again (oldest first).
        assert c.release([leased.lease_ids[0]]) == [True]
        assert c.put([b"room"], [value]) == [Status.OK]
        assert present(c) == [keys[1], *more, b"room"]  # only k0 was evictable
        assert node.metric("memkv_node_arena_used_bytes") == 8 * MiB
        assert node.metric("memkv_node_arena_capacity_bytes") == 8 * MiB


def test_lease_ttl_expiry(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="4MiB")
    value = b"t" * MiB
    with node.client() as c:
        keys = [f"t{i}".encode() for i in range(4)]
        c.put(keys, [value] * 4)
        lease_id = c.lookup([keys[0]], lease_ttl_s=1.0).lease_ids[0]
        assert lease_id
        c.get_into(keys[1:], [bytearray(MiB)] * 3)  # t0 is the least recently used
        assert c.put([b"x1"], [value]) == [Status.OK]
        assert present(c) == [b"t0", b"t2", b"t3", b"x1"]  # t0 survived (leased), t1 went
        time.sleep(1.2)
        assert node.metric("memkv_node_leases") == 0
        assert c.release([lease_id]) == [False]  # nothing left to release
        c.get_into(keys[2:], [bytearray(MiB)] * 2)
        assert c.put([b"x2", b"x3"], [value] * 2) == [Status.OK] * 2
        assert present(c) == [b"t2", b"t3", b"x2", b"x3"]  # the expired lease no longer protects t0
        assert node.metric("memkv_node_leases_expired_total") == 1
        assert node.metric("memkv_node_leases_granted_total") == 1
