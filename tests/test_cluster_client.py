"""ClusterClient against in-process nodes: placement, replicas, leases, listing, stats, the watch."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
from cluster_util import HEARTBEAT_S, InProcCluster, InProcNode, wait_until

from lmcache_memkv.client import NodeClient
from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.cluster.leases import MAX_ATTEMPTS, LeaseBook, OwedRelease, ReleaseQueue
from lmcache_memkv.cluster.suspicion import LocalSuspicion
from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.errors import ConfigError, ConnectError
from lmcache_memkv.proto.memkv.v1 import maintenance_pb2, maintenance_pb2_grpc
from lmcache_memkv.wire.constants import Status

KEY = bytes(range(100, 132))


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcCluster]:
    c = InProcCluster()
    try:
        for name in ("n1", "n2", "n3"):
            c.add(name, key=KEY)
        c.wait_converged(key=KEY)
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: InProcCluster) -> Iterator[ClusterClient]:
    cc = ClusterClient([cluster.nodes[0].control], key=KEY, replicas=2, timeout_s=2.0)
    try:
        cc.start()
        yield cc
    finally:
        cc.close()


def _node(cluster: InProcCluster, node_id: str) -> InProcNode:
    return next(n for n in cluster.nodes if n.node_id == node_id)


def test_view_and_placement(client: ClusterClient, cluster: InProcCluster) -> None:
    assert client.epoch > 0
    members = client.members()
    assert {m.node_id for m in members} == {"n1", "n2", "n3"}
    assert all(m.state == "ALIVE" and m.capacity_bytes == 8 << 20 for m in members)
    by_id = {m.node_id: m for m in members}
    for n in cluster.nodes:
        assert by_id[n.node_id].data_endpoint == n.data
        assert by_id[n.node_id].control_endpoint == n.control
    order = client.placement(b"some key")
    assert sorted(order) == ["n1", "n2", "n3"]
    assert client.placement(b"some key") == order


def test_put_writes_to_the_replica_set_and_reads_back(client: ClusterClient, cluster: InProcCluster) -> None:
    keys = [f"put-{i}".encode() for i in range(60)]
    values = [bytes([i % 251]) * (100 + i) for i in range(60)]
    assert client.put(keys, values) == [True] * 60
    for key, value in zip(keys[:10], values[:10]):
        replicas = client.placement(key)[:2]
        for n in cluster.nodes:
            with NodeClient(n.data, KEY) as nc:
                assert (nc.exists([key])[0] == len(value)) == (n.node_id in replicas), (key, n.node_id)
    buffers = [bytearray(400) for _ in keys]
    assert client.get_into(keys, buffers) == [len(v) for v in values]
    for value, buf in zip(values, buffers):
        assert bytes(buf[: len(value)]) == value
    assert client.exists([*keys, b"absent"]) == [len(v) for v in values] + [None]
    assert client.get_into([b"absent"], [bytearray(8)]) == [None]


def test_reads_fail_over_to_the_second_replica_on_a_miss(client: ClusterClient, cluster: InProcCluster) -> None:
    key = b"failover-miss"
    assert client.put([key], [b"payload"]) == [True]
    first = client.placement(key)[0]
    with NodeClient(_node(cluster, first).data, KEY) as nc:
        assert nc.delete([key]) == [True]  # gone from the first replica only
    buf = bytearray(16)
    assert client.get_into([key], [buf]) == [7] and bytes(buf[:7]) == b"payload"
    assert client.exists([key]) == [7]


def test_reads_ask_the_replica_holding_our_lease_first(client: ClusterClient, cluster: InProcCluster) -> None:
    key = b"lease-first"
    assert client.put([key], [b"old-value"]) == [True]
    first = client.placement(key)[0]
    with NodeClient(_node(cluster, first).data, KEY) as nc:
        assert nc.delete([key]) == [True]
    assert client.exists([key], lease_ttl_s=30) == [9]  # found on, and leased from, the second replica
    with NodeClient(_node(cluster, first).data, KEY) as nc:
        assert nc.put([key], [b"new-value!"]) == [Status.OK]
    buf = bytearray(16)
    # The leased copy is read, though the first replica now has a value too.
    assert client.get_into([key], [buf]) == [9] and bytes(buf[:9]) == b"old-value"
    client.release([key])
    assert client.get_into([key], [buf]) == [10] and bytes(buf[:10]) == b"new-value!"


def test_leases_are_taken_where_found_and_released_there(client: ClusterClient, cluster: InProcCluster) -> None:
    key = b"leased"
    assert client.put([key], [b"x" * 10]) == [True]
    assert client.exists([key], lease_ttl_s=30) == [10]
    assert client.exists([key], lease_ttl_s=30) == [10]
    holder, other = client.placement(key)[:2]
    assert _node(cluster, holder).server.stats()["leases"] == 2  # both on the first replica, which had it
    assert _node(cluster, other).server.stats()["leases"] == 0
    assert client.health()["leases_held"] == 2
    buf = bytearray(10)
    assert client.get_into([key], [buf]) == [10]
    client.release([key])
    client.release([key])
    client.release([key])  # one more than held: nothing to return, no error
    assert _node(cluster, holder).server.stats()["leases"] == 0
    assert client.health()["leases_held"] == 0


def test_a_lease_is_never_released_to_a_later_life_of_its_node(client: ClusterClient, cluster: InProcCluster) -> None:
    key = b"reborn"
    assert client.put([key], [b"v"]) == [True]
    assert client.exists([key], lease_ttl_s=30) == [1]
    holder = client.placement(key)[0]
    # The view now says the holder restarted: the lease died with its old life, and a release
    # sent to the new one would drop a lease some other client holds there.
    members = [dataclasses.replace(m, incarnation=m.incarnation + 1) if m.node_id == holder else m for m in client.members()]
    client._apply(client.epoch + 1, members)
    client.release([key])
    assert _node(cluster, holder).server.stats()["leases"] == 1  # nothing was sent
    assert client.health()["leases_held"] == 0 and client.health()["releases_owed"] == 0


def test_delete_removes_every_copy(client: ClusterClient, cluster: InProcCluster) -> None:
    keys = [b"del-1", b"del-2"]
    assert client.put(keys, [b"a", b"b"]) == [True, True]
    assert client.delete([*keys, b"del-absent"]) == [True, True, True]  # durable: every member confirmed
    for n in cluster.nodes:
        with NodeClient(n.data, KEY) as nc:
            assert nc.exists(keys) == [None, None]


def test_list_keys_pages_over_all_nodes_without_duplicates(client: ClusterClient) -> None:
    keys = sorted(f"list/{i:03d}".encode() for i in range(45))
    assert all(client.put(keys, [b"v" * (i + 1) for i in range(45)]))
    assert client.put([b"other/1"], [b"z"]) == [True]
    seen: list[tuple[bytes, int]] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = client.list_keys(b"list/", cursor, limit=10)
        seen += page
        pages += 1
        if cursor is None:
            break
        assert len(page) == 10
    assert [k for k, _ in seen] == keys  # sorted, each once although stored twice
    assert [n for _, n in seen] == list(range(1, 46))
    assert pages == 5
    with pytest.raises(ValueError, match="cursor"):
        client.list_keys(b"", "garbage")


def test_node_stats_and_cluster_stats(client: ClusterClient, cluster: InProcCluster) -> None:
    assert client.put([b"stats-key"], [b"12345"]) == [True]
    client.get_into([b"stats-key"], [bytearray(5)])
    stats = client.node_stats()
    assert set(stats) == {"n1", "n2", "n3"}
    for node_id, s in stats.items():
        assert s["capacity_bytes"] == 8 << 20 and s["state"] == "ALIVE" and s["node_id"] == node_id
        for field in (
            "used_bytes",
            "keys",
            "hits",
            "misses",
            "hit_ratio",
            "ops_total",
            "ops_per_second",
            "evictions",
            "leases",
        ):
            assert field in s
    assert sum(s["hits"] for s in stats.values()) >= 1
    assert sum(s["ops_total"] for s in stats.values()) > 0
    assert sum(s["ops_per_second"] for s in stats.values()) > 0
    channel = open_channel(cluster.nodes[1].control, KEY)
    try:
        reply = maintenance_pb2_grpc.MaintenanceStub(channel).ClusterStats(
            maintenance_pb2.ClusterStatsRequest(), timeout=3
        )
    finally:
        channel.close()
    assert [n.node_id for n in reply.nodes] == ["n1", "n2", "n3"] and reply.members_up == 3
    assert reply.total.keys == sum(s["keys"] for s in stats.values())
    assert reply.total.capacity_bytes == 3 * (8 << 20)
    health = client.health()
    assert health["members_up"] == 3 and health["members_down"] == 0 and health["epoch"] == client.epoch
    assert health["watching"] in {n.control for n in cluster.nodes}


def test_watch_follows_joins_and_leaves(cluster: InProcCluster) -> None:
    cc = ClusterClient([cluster.nodes[0].control], key=KEY, replicas=2, timeout_s=2.0)
    extra: InProcNode | None = None
    try:
        cc.start()
        epoch0 = cc.epoch
        extra = InProcNode("n4", seeds=[cluster.nodes[1].control], key=KEY)
        _, joined = wait_until(
            "client sees n4 ALIVE",
            lambda: any(m.node_id == "n4" and m.state == "ALIVE" for m in cc.members()),
            10 * HEARTBEAT_S,
        )
        assert cc.epoch > epoch0
        epoch1 = cc.epoch
        extra.stop()
        _, left = wait_until(
            "client sees n4 LEFT",
            lambda: any(m.node_id == "n4" and m.state == "LEFT" for m in cc.members()),
            10 * HEARTBEAT_S,
        )
        assert cc.epoch > epoch1
        assert "n4" not in cc.placement(b"any")
        print(f"client saw a join after {joined:.2f}s and a leave after {left:.2f}s")
    finally:
        if extra is not None:
            extra.stop()
        cc.close()


def test_concurrent_callers(client: ClusterClient) -> None:
    """Several threads at once, as LMCache's store, fetch and lookup pools call it."""
    # A member an earlier test stopped must have left this client's placement: until then a
    # write placed on it is rightly not acknowledged.
    wait_until(
        "placement holds only ALIVE members",
        lambda: set(client.placement(b"x")) == {m.node_id for m in client.members() if m.state == "ALIVE"},
        10,
    )
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for r in range(15):
                keys = [f"thr-{t}-{r}-{i}".encode() for i in range(8)]
                vals = [bytes([t, r, i]) * 50 for i in range(8)]
                assert client.put(keys, vals) == [True] * 8
                assert client.exists(keys, lease_ttl_s=5) == [150] * 8
                bufs = [bytearray(150) for _ in keys]
                assert client.get_into(keys, bufs) == [150] * 8
                assert [bytes(b) for b in bufs] == vals
                client.release(keys)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors[0]
    assert client.health()["leases_held"] == 0


def test_start_names_every_server_when_none_answers() -> None:
    import socket

    dead = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead.append(f"127.0.0.1:{s.getsockname()[1]}")
    cc = ClusterClient(dead, timeout_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError) as info:
            cc.start()
    finally:
        cc.close()
    assert time.monotonic() - started < 1.0 + 1.0
    message = str(info.value)
    assert all(ep in message for ep in dead) and "MEMKV_SERVERS" in message and '"servers"' in message


def test_wrong_key_is_reported(cluster: InProcCluster) -> None:
    cc = ClusterClient([cluster.nodes[0].control], key=bytes(32), timeout_s=1.0)
    try:
        with pytest.raises(ConnectError, match=r"UNAUTHENTICATED.*MEMKV_AUTH_KEY"):
            cc.start()
    finally:
        cc.close()


def test_config_errors() -> None:
    for kwargs, match in (
        ({"servers": []}, "MEMKV_SERVERS"),
        ({"servers": ["nohost"]}, "servers"),
        ({"servers": ["127.0.0.1:1"], "replicas": 0}, "replicas"),
        ({"servers": ["127.0.0.1:1"], "timeout_s": 0}, "timeout_s"),
    ):
        with pytest.raises(ConfigError, match=match):
            ClusterClient(**kwargs)  # type: ignore[arg-type]


def test_garbage_list_cursors_are_refused_not_restarted() -> None:
    """A cursor this client did not issue is a ValueError; before the fix garbage decoded to an
    empty key and listing silently started again from the first page."""
    from lmcache_memkv.cluster.client import _decode_cursor, _encode_cursor

    assert _decode_cursor(_encode_cursor(b"model@1@0@abc")) == b"model@1@0@abc"
    cc = ClusterClient(["127.0.0.1:1"])
    try:
        for junk in ("garbage", "v2.!!!!", "v2.", "v2.a", "v1.YWJj", "v2.YWJj=x", "v2." + "QUFB" * 200):
            with pytest.raises(ValueError, match="cursor"):
                cc.list_keys(cursor=junk)
    finally:
        cc.close()


def test_client_before_start_misses_instead_of_failing() -> None:
    cc = ClusterClient(["127.0.0.1:1"])
    try:
        assert cc.put([b"k"], [b"v"]) == [False]
        assert cc.get_into([b"k"], [bytearray(1)]) == [None]
        assert cc.exists([b"k"]) == [None]
        assert cc.list_keys() == ([], None)
        assert cc.epoch == 0 and cc.members() == []
    finally:
        cc.close()
        cc.close()  # idempotent
    with pytest.raises(ConnectError, match="closed"):
        cc.put([b"k"], [b"v"])


# ---------------------------------------------------------------------- pure helpers


def test_local_suspicion_back_off_and_incarnation() -> None:
    now = [0.0]
    s = LocalSuspicion(backoff_s=1.5, clock=lambda: now[0])
    assert s.healthy("a", 1)
    assert s.mark("a", 1) and not s.mark("a", 1)
    assert not s.healthy("a", 1)
    assert s.healthy("a", 2)  # restarted: the mark no longer applies
    s.mark("a", 1)
    now[0] = 1.6
    assert s.healthy("a", 1) and s.suspected() == {}


def test_lease_book_keeps_every_lease_id_per_key_and_grantor() -> None:
    book = LeaseBook()
    book.add(b"k", ("a", 1), 11)
    book.add(b"k", ("a", 1), 12)
    book.add(b"k", ("b", 7), 13)
    book.add(b"k", ("a", 2), 14)  # the same node after a restart: a different grantor
    assert book.count() == 4 and book.holders(b"k") == ["a", "b"]
    assert book.holders_many([b"k", b"none"]) == [["a", "b"], []]
    taken = sorted(filter(None, (book.take(b"k") for _ in range(5))))
    assert taken == [(("a", 1), 11), (("a", 1), 12), (("a", 2), 14), (("b", 7), 13)]
    assert book.count() == 0 and book.take(b"k") is None


def test_lease_records_expire_with_their_ttl() -> None:
    book = LeaseBook()
    book.add_many([(b"a", ("n", 1), 1), (b"b", ("n", 1), 2)], until=10.0)
    book.add(b"a", ("n", 1), 3, until=20.0)  # leased again: each lease keeps its own TTL
    assert book.expire(9.9) == 0
    assert book.expire(10.0) == 2 and book.holders(b"b") == [] and book.count() == 1
    assert book.take(b"a") == (("n", 1), 3)  # the lease the node still holds
    book.add(b"a", ("n", 1), 5, until=30.0)
    assert book.expire(20.0) == 0 and book.count() == 1  # the lease taken early is not counted again
    assert book.expire(30.0) == 1 and book.count() == 0
    book.add(b"c", ("n", 1), 4, until=5.0)
    assert book.take(b"c") == (("n", 1), 4)
    assert book.expire(100.0) == 0  # released before it ran out: nothing left to drop


def test_release_queue_backs_off_and_gives_up() -> None:
    q = ReleaseQueue()
    item = OwedRelease(77, "a", 1)
    now = 0.0
    dropped = 0
    tries = 0
    while True:
        dropped += q.owe([item], now)
        if dropped:
            break
        assert q.due(now) == {}  # not yet
        now = item.next_try
        assert q.due(now) == {"a": [item]}
        tries += 1
    assert tries == MAX_ATTEMPTS - 1 and len(q) == 0
    assert now < 15  # bounded: the lease TTL takes over after this
