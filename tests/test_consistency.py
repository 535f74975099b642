"""Never a wrong byte: after an acknowledged write or delete, no read anywhere returns the value it
replaced, whatever a replica did meanwhile. Real node processes on loopback, R=2.

Each test reads every key back from every node directly (not only through the client's
fail-over), so a stale copy anywhere is found even when the client would not have read it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import pytest
from cluster_util import DEAD_S, FAST_ARGS, HEARTBEAT_S, wait_until
from nodeproc import NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import Status

NodeFactory = Callable[..., NodeProcess]
KEY = bytes(range(50, 82))
ENV = {"MEMKV_AUTH_KEY": KEY.hex()}
BOUND_S = DEAD_S + 20 * HEARTBEAT_S
SIZE = 4096


def _cluster(node_factory: NodeFactory, n: int, capacity: str = "16MiB", extra: tuple[str, ...] = ()) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    for i in range(n):
        args = ["--node-id", f"n{i + 1}", *FAST_ARGS, *extra]
        if nodes:
            args += ["--seed", str(nodes[0].control)]
        nodes.append(node_factory(capacity=capacity, args=args, env=ENV))
    return nodes


@pytest.fixture
def three(node_factory: NodeFactory) -> Iterator[tuple[ClusterClient, list[NodeProcess]]]:
    nodes = _cluster(node_factory, 3)
    client = ClusterClient([str(nodes[0].control)], key=KEY, replicas=2, timeout_s=1.0)
    try:
        client.start()
        wait_until("three ALIVE members", lambda: len(client.placement(b"x")) == 3, BOUND_S)
        yield client, nodes
    finally:
        client.close()


def _value(key: bytes, generation: int) -> bytes:
    return (b"%s@%d|" % (key, generation)).ljust(SIZE, b".")


def _direct(nodes: list[NodeProcess], key: bytes) -> dict[str, bytes | None]:
    """What each node itself holds for ``key`` (None: nothing)."""
    out: dict[str, bytes | None] = {}
    for node in nodes:
        with NodeClient(node.data, key=KEY, timeout_s=2.0) as c:
            buf = bytearray(1 << 16)
            (n,) = c.get_into([key], [buf])
            out[node.node_id] = None if n is None else bytes(buf[:n])
    return out


def _read(client: ClusterClient, keys: list[bytes]) -> list[bytes | None]:
    buffers = [bytearray(SIZE) for _ in keys]
    lengths = client.get_into(keys, buffers)
    return [None if n is None else bytes(b[:n]) for n, b in zip(lengths, buffers)]


def _put_until_acked(client: ClusterClient, keys: list[bytes], values: list[bytes], bound_s: float) -> None:
    """Writes that involve a failing replica are refused until the cluster declares it DEAD."""
    pending = dict(zip(keys, values))
    deadline = time.monotonic() + bound_s
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} writes never acknowledged"
        ks = list(pending)
        for k, ok in zip(ks, client.put(ks, [pending[k] for k in ks])):
            if ok:
                del pending[k]
        time.sleep(0.05)


def test_an_overwrite_one_replica_refuses_leaves_no_stale_copy(node_factory: NodeFactory) -> None:
    """R=2 on two nodes; n2's arena is leased full by another client, so n2 refuses the
    overwrites (NO_SPACE). The overwrite is acknowledged (n1 stored it, n2 dropped the old
    value) and no read, through the client or straight from either node, returns the old value.
    Before the fix n2 kept the old value and every read that went to n2 returned it."""
    nodes = _cluster(node_factory, 2, capacity="1MiB", extra=("--lease-budget", "1MiB"))
    client = ClusterClient([str(nodes[0].control)], key=KEY, replicas=2, timeout_s=1.0)
    try:
        client.start()
        wait_until("two ALIVE members", lambda: len(client.placement(b"x")) == 2, BOUND_S)
        keys = [b"refuse/%03d" % i for i in range(64)]  # 64 x 4 KiB: a quarter of each arena
        assert client.put(keys, [_value(k, 1) for k in keys]) == [True] * len(keys)
        n2 = nodes[1]
        with NodeClient(n2.data, key=KEY, timeout_s=5.0) as hog:
            filler = [b"fill/%04d" % i for i in range(192)]  # the rest of n2's arena
            assert hog.put(filler, [b"f" * SIZE] * len(filler)) == [Status.OK] * len(filler)
            leased = hog.lookup([*keys, *filler], lease_ttl_s=60)
            assert all(leased.lease_ids), "n2 should now be leased full"
            bigger = [_value(k, 2) + b"+" * 256 for k in keys]  # no room for these on n2
            assert client.put(keys, bigger) == [True] * len(keys)  # stored on n1, dropped on n2
            for k, v in zip(keys, bigger):
                held = _direct(nodes, k)  # n2 may have found room for some after dropping old values
                assert held["n1"] == v and held["n2"] in (None, v), f"a node serves the replaced value of {k!r}"
            got = []
            for k, v in zip(keys, bigger):
                buf = bytearray(len(v))
                (n,) = client.get_into([k], [buf])
                got.append(n is not None and bytes(buf) == v)
            assert all(got), "every acknowledged overwrite reads back as written"
    finally:
        client.close()


def test_a_frozen_replica_comes_back_without_overwritten_or_deleted_values(
    three: tuple[ClusterClient, list[NodeProcess]],
) -> None:
    """SIGSTOP n2 while keys are overwritten and deleted (acknowledged once the cluster declares
    it DEAD), then SIGCONT. n2 knows it stalled past the DEAD timeout, drops its data, and rejoins
    with a new incarnation: no overwritten key reads old and no deleted key exists again, from any
    client or straight from any node. Before the fix about a third of the overwritten keys read
    old and two thirds of the deleted ones came back."""
    client, nodes = three
    victim = nodes[1]
    keys = [b"freeze/%03d" % i for i in range(90)]
    assert client.put(keys, [_value(k, 1) for k in keys]) == [True] * len(keys)
    assert sum(victim.node_id in client.placement(k)[:2] for k in keys) > 30
    overwrite, delete = keys[::2], keys[1::2]
    victim.signal(signal.SIGSTOP)
    try:
        wait_until("the client sees n2 DEAD", lambda: {m.node_id: m.state for m in client.members()}["n2"] == "DEAD", BOUND_S)
        _put_until_acked(client, overwrite, [_value(k, 2) for k in overwrite], BOUND_S)
        assert client.delete(delete) == [True] * len(delete)  # every member not DEAD confirmed
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(
        "n2 ALIVE again with a new incarnation",
        lambda: {m.node_id: m.state for m in client.members()}["n2"] == "ALIVE",
        BOUND_S,
    )
    assert victim.metric("memkv_node_wipes_total") >= 1
    fresh = ClusterClient([str(nodes[2].control)], key=KEY, replicas=2, timeout_s=1.0)
    try:
        fresh.start()
        wait_until("the fresh client sees three ALIVE", lambda: len(fresh.placement(b"x")) == 3, BOUND_S)
        for reader in (client, fresh):
            got = _read(reader, overwrite)
            assert all(g == _value(k, 2) for g, k in zip(got, overwrite)), "acknowledged overwrites read back"
            assert _read(reader, delete) == [None] * len(delete), "a deleted key came back"
    finally:
        fresh.close()
    for k in overwrite:
        assert set(_direct(nodes, k).values()) <= {None, _value(k, 2)}, f"a node holds the replaced value of {k!r}"
    for k in delete:
        assert set(_direct(nodes, k).values()) == {None}, f"a node holds deleted {k!r}"


def test_a_delayed_older_write_cannot_replace_a_newer_one(three: tuple[ClusterClient, list[NodeProcess]]) -> None:
    """Versions: a write that arrives after a newer one (a retry, a slow connection) is STALE on
    every node, and so is one older than an acknowledged delete."""
    client, nodes = three
    key = b"order/1"
    old_version = CLOCK.next()[0]
    assert client.put([key], [_value(key, 2)]) == [True]
    replicas = client.placement(key)[:2]
    for node in nodes:
        if node.node_id in replicas:
            with NodeClient(node.data, key=KEY) as c:
                assert c.put([key], [_value(key, 1)], versions=[old_version]) == [Status.STALE]
    assert _read(client, [key]) == [_value(key, 2)]
    assert client.delete([key]) == [True]
    for node in nodes:
        with NodeClient(node.data, key=KEY) as c:
            assert c.put([key], [_value(key, 3)], versions=[old_version + 1]) == [Status.STALE]
    assert _read(client, [key]) == [None]


def test_a_wrong_size_copy_is_purged_alone(three: tuple[ClusterClient, list[NodeProcess]]) -> None:
    """A reader that needs exactly one size skips a replica holding another size for the next
    replica, and only that copy is purged: the good replica keeps serving. Before the fix the
    adapter deleted the key on every node, good replicas included."""
    client, nodes = three
    keys = [b"size/%02d" % i for i in range(12)]
    assert client.put(keys, [_value(k, 1) for k in keys]) == [True] * len(keys)
    by_id = {n.node_id: n for n in nodes}
    firsts = {k: client.placement(k)[0] for k in keys}
    for k in keys:  # a newer, wrong-size value on each key's first replica only
        with NodeClient(by_id[firsts[k]].data, key=KEY) as c:
            assert c.put([k], [b"short"]) == [Status.OK]
    buffers = [bytearray(SIZE) for _ in keys]
    assert client.get_into(keys, buffers, exact=True) == [SIZE] * len(keys)
    assert [bytes(b) for b in buffers] == [_value(k, 1) for k in keys]
    for k in keys:
        wait_until(f"the short copy of {k!r} purged", lambda k=k: _direct(nodes, k)[firsts[k]] is None, 5.0)
        second = client.placement(k)[1]
        assert _direct(nodes, k)[second] == _value(k, 1), "the good replica was purged too"


def test_a_delete_that_a_newer_write_outranks_is_not_acknowledged(three: tuple[ClusterClient, list[NodeProcess]]) -> None:
    """A node holding a newer write of the key answers STALE: the delete did not happen there, so
    it is not reported durable for that key (other keys of the batch are)."""
    client, nodes = three
    keys = [b"del-race/1", b"del-race/2"]
    assert client.put(keys, [_value(k, 1) for k in keys]) == [True, True]
    newer = CLOCK.next()[0] + (10_000_000 << 10)  # a writer ten seconds ahead
    first = {n.node_id: n for n in nodes}[client.placement(keys[0])[0]]
    with NodeClient(first.data, key=KEY) as c:
        assert c.put([keys[0]], [_value(keys[0], 2)], versions=[newer]) == [Status.OK]
    assert client.delete(keys) == [False, True]
    assert _direct(nodes, keys[0])[first.node_id] == _value(keys[0], 2)
