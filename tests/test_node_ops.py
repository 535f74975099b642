"""Every data-plane op against a real node process: small, empty, large and many values; many threads."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import rawwire
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.errors import ConnectError, MemKVTimeout, ServerError
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import ErrorCode, Status
from lmcache_memkv.wire.messages import PutRequest, encode

MiB = 1 << 20


@pytest.fixture
def client(shared_node: NodeProcess) -> Iterator[NodeClient]:
    c = shared_node.client(timeout_s=10)
    try:
        yield c
    finally:
        c.close()


def pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes that differ at every offset between seeds (cheap for large sizes)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


def test_small_and_empty_values(client: NodeClient) -> None:
    keys = [b"small/a", b"small/b", b"small/empty"]
    values = [b"x", os.urandom(1000), b""]
    assert client.put(keys, values) == [Status.OK] * 3
    bufs = [bytearray(10), bytearray(1000), bytearray(1)]
    assert client.get_into(keys, bufs) == [1, 1000, 0]
    assert bufs[0][:1] == b"x" and bytes(bufs[1]) == values[1]
    assert client.exists([*keys, b"small/none"]) == [1, 1000, 0, None]


def test_large_value_round_trip(client: NodeClient) -> None:
    value = os.urandom(32 * MiB)
    assert client.put([b"large/32MiB"], [value], timeout_s=30) == [Status.OK]
    buf = bytearray(32 * MiB)
    assert client.get_into([b"large/32MiB"], [buf], timeout_s=30) == [32 * MiB]
    assert buf == value
    assert client.exists([b"large/32MiB"]) == [32 * MiB]
    assert client.delete([b"large/32MiB"]) == [True]


def test_many_values_in_one_batch(client: NodeClient) -> None:
    keys = [f"many/{i:04d}".encode() for i in range(1000)]
    values = [pattern(i, i % 300) for i in range(1000)]
    assert client.put(keys, values) == [Status.OK] * 1000
    bufs = [bytearray(300) for _ in keys]
    lengths = client.get_into(keys, bufs)
    assert lengths == [len(v) for v in values]
    assert all(bytes(b[:n]) == v for b, n, v in zip(bufs, lengths, values, strict=True) if n is not None)


def test_refused_values_inside_a_batch_of_small_values(client: NodeClient) -> None:
    """The node reads small values whose bytes have all arrived in one call; a refused value among
    them (STALE: the node holds a newer version) has its bytes skipped, and every value around it,
    empty ones and a key written twice included, lands whole and in its place."""
    keys = [f"group/{i:03d}".encode() for i in range(40)]
    older = CLOCK.next(40)
    assert client.put([keys[7], keys[20], keys[21]], [b"newer7", b"newer20", b"newer21"]) == [Status.OK] * 3
    keys[30] = keys[29]  # the same key twice in one batch: the later write wins
    values = [pattern(i, 0 if i % 9 == 4 else 1000 + 37 * i) for i in range(40)]
    statuses = client.put(keys, values, versions=older)
    assert statuses == [Status.STALE if i in (7, 20, 21) else Status.OK for i in range(40)]
    bufs = [bytearray(3000) for _ in keys]
    lengths = client.get_into(keys, bufs)
    for i, (key, buf, n) in enumerate(zip(keys, bufs, lengths, strict=True)):
        want = {7: b"newer7", 20: b"newer20", 21: b"newer21"}.get(i, values[30] if key == keys[30] else values[i])
        assert (n, bytes(buf[: n or 0])) == (len(want), want), (i, key)


def test_small_values_read_together_on_a_nearly_full_node_land_as_one_at_a_time(node_factory: NodeFactory) -> None:
    """Room for one 60 KiB value, the rest leased: a PUT of two (both queued, so read in one call)
    lands both, the second evicting the first, as value-by-value reads would; the same key twice
    keeps the later value. Claiming the second before the first landed refused it (NO_SPACE, and
    the key's tombstone made the first STALE)."""
    node = node_factory(capacity="1MiB", args=["--lease-budget", "950KiB"])
    with node.client() as c:
        pinned = [b"pin/%02d" % i for i in range(19)]
        assert c.put(pinned, [b"p" * (50 << 10)] * 19) == [Status.OK] * 19
        assert all(c.lookup(pinned, lease_ttl_s=60).lease_ids)
        first, second = pattern(1, 60 << 10), pattern(2, 60 << 10)
        for keys in ([b"full/a", b"full/b"], [b"full/k", b"full/k"]):
            sock = rawwire.connect(node.address)
            try:
                frame = encode(PutRequest(keys=keys, sizes=[60 << 10] * 2, versions=CLOCK.next(2)), 1)
                sock.sendall(frame + first + second)
                assert list(rawwire.read_frame(sock)[1].statuses) == [Status.OK, Status.OK]  # type: ignore[attr-defined]
            finally:
                sock.close()
            buf = bytearray(64 << 10)
            assert c.get_into([keys[1]], [buf]) == [60 << 10]
            assert bytes(buf[: 60 << 10]) == second
        assert c.stats()["no_space"] == 0


def test_get_misses_and_short_buffers(client: NodeClient) -> None:
    client.put([b"get/k"], [b"0123456789"])
    bufs = [bytearray(9), bytearray(64), bytearray(10)]
    # Too small a buffer is a miss (the value is never half-written); bigger is fine.
    assert client.get_into([b"get/k", b"get/k", b"get/absent"], bufs) == [None, 10, None]
    assert bufs[0] == bytearray(9) and bytes(bufs[1][:10]) == b"0123456789"


def test_get_into_memoryview_slices_of_one_region(client: NodeClient) -> None:
    """The adapter hands out views into one big L1 region: values land exactly in their slices."""
    values = [pattern(100 + i, 5000) for i in range(4)]
    keys = [f"region/{i}".encode() for i in range(4)]
    client.put(keys, [memoryview(v) for v in values])
    region = bytearray(4 * 8192)
    views = [memoryview(region)[i * 8192 : (i + 1) * 8192] for i in range(4)]
    assert client.get_into(keys, views) == [5000] * 4
    for i, v in enumerate(values):
        assert region[i * 8192 : i * 8192 + 5000] == v
        assert region[i * 8192 + 5000 : (i + 1) * 8192] == bytes(8192 - 5000)


def test_overwrite_is_idempotent(client: NodeClient) -> None:
    for value in (b"one", b"one", b"a longer second value", b"3"):
        assert client.put([b"ow/k"], [value]) == [Status.OK]
        buf = bytearray(64)
        assert client.get_into([b"ow/k"], [buf]) == [len(value)]
        assert bytes(buf[: len(value)]) == value
    # Duplicate keys in one batch: the last one wins.
    client.put([b"ow/d", b"ow/d"], [b"first", b"second"])
    buf = bytearray(16)
    assert client.get_into([b"ow/d"], [buf]) == [6] and buf[:6] == b"second"


def test_exists_lease_release(client: NodeClient) -> None:
    client.put([b"lease/a"], [b"v"])
    reply = client.lookup([b"lease/a", b"lease/none"], lease_ttl_s=30)
    assert list(reply.statuses) == [Status.OK, Status.MISS] and list(reply.lengths) == [1, 0]
    lease_id = reply.lease_ids[0]
    assert lease_id and reply.lease_ids[1] == 0
    assert client.release([lease_id, lease_id, 999]) == [True, False, False]
    assert client.exists([b"lease/a"], lease_ttl_s=0.0001) == [1]  # tiny TTLs still lease
    with pytest.raises(ValueError, match="lease_ttl_s"):
        client.exists([b"lease/a"], lease_ttl_s=5_000_000)


def test_delete(client: NodeClient) -> None:
    client.put([b"del/a", b"del/b"], [b"1", b"2"])
    assert client.delete([b"del/a", b"del/a", b"del/zz"]) == [True, False, False]
    assert client.put([b"del/a"], [b"x"], versions=[1]) == [Status.STALE]  # the delete outranks an older write
    assert client.exists([b"del/a", b"del/b"]) == [None, 1]


def test_list_pages(client: NodeClient) -> None:
    keys = [f"list/{i:05d}".encode() for i in range(2500)]
    for i in range(0, 2500, 500):
        client.put(keys[i : i + 500], [b"v" * (j % 7) for j in range(i, i + 500)])
    page, cursor = client.list_keys(prefix=b"list/", limit=1000)
    assert [k for k, _ in page] == keys[:1000] and cursor == keys[999]
    page, cursor = client.list_keys(prefix=b"list/", cursor=cursor, limit=1000)
    assert [k for k, _ in page] == keys[1000:2000]
    page, cursor = client.list_keys(prefix=b"list/", cursor=cursor, limit=1000)
    assert [k for k, _ in page] == keys[2000:] and cursor == b""
    assert list(client.iter_keys(b"list/", page=700)) == [(k, i % 7) for i, k in enumerate(keys)]
    assert client.list_keys(prefix=b"list/nothing") == ([], b"")


def test_ping_and_stats(client: NodeClient, shared_node: NodeProcess) -> None:
    assert 0 < client.ping() < 1
    stats = client.stats()
    assert stats["node_id"] == shared_node.node_id
    assert stats["capacity_bytes"] == 128 * MiB
    assert {"used_bytes", "keys", "leases", "hits", "misses", "evictions", "uptime_s"} <= set(stats)


def test_many_threads_byte_exact(shared_node: NodeProcess) -> None:
    """Eight threads share one client (and its pool); every byte read back is the byte written."""
    client = shared_node.client(timeout_s=20)
    errors: list[str] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for rnd in range(15):
                n = rng.randint(1, 16)
                keys = [f"thr/{t}/{rnd}/{i}".encode() for i in range(n)]
                sizes = [rng.choice([0, 1, 255, 4096, 65_537, 300_000]) for _ in keys]
                values = [pattern(t * 100_000 + rnd * 100 + i, s) for i, s in enumerate(sizes)]
                if client.put(keys, values) != [Status.OK] * n:
                    errors.append(f"thread {t}: put failed")
                bufs = [bytearray(s + 7) for s in sizes]
                if client.get_into(keys, bufs) != sizes:
                    errors.append(f"thread {t}: wrong lengths")
                for b, s, v in zip(bufs, sizes, values, strict=True):
                    if bytes(b[:s]) != v:
                        errors.append(f"thread {t}: bytes differ")
        except Exception as exc:  # reported below, with the thread that saw it
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    client.close()
    assert errors == []


def test_pool_reuses_connections(shared_node: NodeProcess) -> None:
    before = shared_node.metric("memkv_node_connections_accepted_total")
    with shared_node.client() as c:
        for _ in range(20):
            c.ping()
    assert shared_node.metric("memkv_node_connections_accepted_total") - before == 1


def test_node_limits_are_reported_with_node_and_op(node_factory: NodeFactory) -> None:
    node = node_factory(args=["--max-batch", "4"])
    with node.client() as c:
        with pytest.raises(ServerError, match=rf"memkv node {node.data}.*batch of 5 items exceeds the limit of 4") as i:
            c.exists([b"k%d" % i for i in range(5)])
        assert i.value.code == ErrorCode.LIMIT
        assert "EXISTS of 5 keys" in str(i.value)
        # PUTs are split to the limits the node announced in its HELLO.
        assert c.put([b"k%d" % i for i in range(9)], [b"v"] * 9) == [Status.OK] * 9


def test_client_validates_before_sending(client: NodeClient) -> None:
    with pytest.raises(ValueError, match="key #1 is 513 bytes"):
        client.put([b"ok", b"x" * 513], [b"1", b"2"])
    with pytest.raises(ValueError, match="key #0 is 0 bytes"):
        client.exists([b""])
    with pytest.raises(TypeError, match="must be bytes"):
        client.delete(["str-key"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="read-only"):
        client.get_into([b"k"], [b"immutable"])
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        client.put([b"a", b"b"], [b"1"])
    assert client.ping() > 0  # nothing above touched the connection


def test_connect_refused_names_the_node() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with NodeClient(f"127.0.0.1:{port}", timeout_s=2) as c, pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        c.ping()


def test_silent_peer_times_out_within_the_call_timeout() -> None:
    """A node that accepts but never answers turns into a timeout, not a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with NodeClient(endpoint, timeout_s=5) as c:
            started = time.monotonic()
            with pytest.raises(MemKVTimeout, match=rf"memkv node {endpoint}: GET of 1 keys timed out after 0.3s"):
                c.get_into([b"k"], [bytearray(4)], timeout_s=0.3)
            assert time.monotonic() - started < 2
    finally:
        listener.close()


def test_dead_node_turns_into_errors_not_hangs(node_factory: NodeFactory) -> None:
    node = node_factory()
    c = node.client(timeout_s=2)
    c.put([b"k"], [b"v"])
    node.kill()
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(ConnectError, match=node.data):
            c.get_into([b"k"], [bytearray(1)])
    assert time.monotonic() - started < 3
    c.close()
