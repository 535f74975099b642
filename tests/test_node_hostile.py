"""Hostile clients against a real node: nothing one client does can flush, pin or lock out the node.

Each test first shows the attack was made (the node saw it) and then that the node's data and its
other clients were unaffected.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import rawwire
from cluster_util import wait_until
from nodeproc import NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import AuthOk, Hello, PutRequest, encode

NodeFactory = Callable[..., NodeProcess]
MiB = 1 << 20
KEY = bytes(range(90, 122))
ENV = {"MEMKV_AUTH_KEY": KEY.hex()}


def _fill(c: NodeClient, n: int, size: int = MiB, prefix: bytes = b"resident") -> list[bytes]:
    keys = [b"%s/%04d" % (prefix, i) for i in range(n)]
    assert c.put(keys, [bytes([i % 251]) * size for i in range(n)]) == [Status.OK] * n
    return keys


def _present(c: NodeClient, keys: list[bytes]) -> int:
    return sum(n is not None for n in c.exists(keys))


def test_a_put_header_followed_by_a_hang_up_evicts_nothing(node_factory: NodeFactory) -> None:
    """A PUT announcing 64 x 1 MiB, then a hang-up after about 1 KB: space is reserved only as
    each value's bytes arrive, so no resident entry is evicted. Before the fix the node reserved
    the whole batch up front and this one frame flushed the node."""
    node = node_factory(capacity="64MiB")
    with node.client() as c:
        keys = _fill(c, 64)
        before = node.metric("memkv_node_connections")  # our own client's
        sock = rawwire.connect(node.address)
        frame = encode(PutRequest(keys=[b"flush/%02d" % i for i in range(64)], sizes=[MiB] * 64, versions=CLOCK.next(64)), 1)
        assert len(frame) < 2048
        sock.sendall(frame)
        sock.close()
        time.sleep(0.3)
        assert node.metric("memkv_node_connections") == before  # the node has finished with it
        assert _present(c, keys) == 64
        assert node.metric("memkv_node_evictions_total") == 0


def test_a_client_dying_mid_put_evicts_at_most_the_values_it_began(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="64MiB")
    with node.client() as c:
        keys = _fill(c, 64)
        sock = rawwire.connect(node.address)
        frame = encode(PutRequest(keys=[b"dying/%02d" % i for i in range(64)], sizes=[MiB] * 64, versions=CLOCK.next(64)), 1)
        sock.sendall(frame + b"x" * (MiB + MiB // 2))  # one whole value and half of the next
        sock.close()
        time.sleep(0.3)
        evicted = node.metric("memkv_node_evictions_total")
        assert 1 <= evicted <= 2
        assert _present(c, keys) == 64 - evicted


def test_a_client_dying_mid_put_of_small_values_evicts_only_for_bytes_that_came(node_factory: NodeFactory) -> None:
    """Small values are reserved ahead of the one being read only once all their bytes are in the
    node's socket: a client that announces 64 x 16 KiB and sends three and a half values makes the
    node evict room for at most four."""
    node = node_factory(capacity="4MiB")
    with node.client() as c:
        keys = _fill(c, 256, size=16 << 10)
        sock = rawwire.connect(node.address)
        frame = encode(PutRequest(keys=[b"dying/%02d" % i for i in range(64)], sizes=[16 << 10] * 64, versions=CLOCK.next(64)), 1)
        sock.sendall(frame + b"y" * (3 * (16 << 10) + (8 << 10)))
        time.sleep(0.3)  # every byte in the node's socket before the hang-up
        sock.close()
        wait_until("the node to drop the dead connection", lambda: node.metric("memkv_node_connections") == 1, 5)  # ours is left
        evicted = node.metric("memkv_node_evictions_total")
        assert 3 <= evicted <= 4
        assert _present(c, keys) == 256 - evicted
        assert c.exists([b"dying/%02d" % i for i in range(4)]) == [16 << 10] * 3 + [None]


def test_a_value_that_cannot_fit_fails_at_once_and_evicts_nothing(node_factory: NodeFactory) -> None:
    """Half the arena leased: a value bigger than everything evictable is refused before anything
    is evicted (before the fix it evicted almost everything and then failed anyway)."""
    node = node_factory(capacity="16MiB", args=["--lease-budget", "8MiB"])
    with node.client() as c:
        keys = _fill(c, 16)
        assert all(c.lookup(keys[:8], lease_ttl_s=60).lease_ids)
        assert c.put([b"huge"], [b"h" * (9 * MiB)]) == [Status.NO_SPACE]
        assert node.metric("memkv_node_evictions_total") == 0
        assert _present(c, keys) == 16
        assert c.put([b"fits"], [b"f" * (8 * MiB)]) == [Status.OK]  # the evictable half can be made room


def test_a_lease_hog_cannot_pin_the_node_or_drop_others_leases(node_factory: NodeFactory) -> None:
    """One client leases everything for 49 days: the node cuts the TTL to --max-lease-ttl and
    leases it at most its budget (half the arena by default), so writers still get room;
    and no client releases another's leases. Before the fix the hog pinned the whole arena for
    49 days and any client could release anyone's leases."""
    node = node_factory(capacity="16MiB", args=["--max-lease-ttl", "2"])
    with node.client() as hog, node.client() as writer, node.client() as reader:
        keys = _fill(hog, 16)
        got = hog.lookup(keys, lease_ttl_s=49 * 86400)
        assert sum(1 for lid in got.lease_ids if lid) == 8  # 8 MiB: its budget
        assert [s for s in got.statuses].count(Status.LEASE_LIMIT) == 8
        assert node.metric("memkv_node_leases_denied_total") == 8
        fresh = _fill(writer, 8, prefix=b"writer")  # room: the unleased 8 MiB are evictable
        assert _present(writer, fresh) == 8
        mine = reader.lookup([keys[0]], lease_ttl_s=60).lease_ids[0]
        assert mine
        held = [lid for lid in got.lease_ids if lid]
        assert reader.release(held) == [False] * 8  # not its leases: nothing released
        assert writer.release([mine]) == [False]
        assert node.metric("memkv_node_leases") == 9
        time.sleep(2.3)  # the node's TTL cap, not the 49 days asked for
        assert node.metric("memkv_node_leases") == 0
        assert hog.release(held) == [False] * 8  # expired; a late release is harmless


def test_eviction_with_100k_leased_entries_answers_at_once(node_factory: NodeFactory) -> None:
    """100k leased entries stay off the LRU list: a PUT that must evict answers in well under a
    second, and another client's EXISTS is not held up. Before the fix every victim scan walked
    the leased entries under the store lock (a 16-value PUT took over 10 s)."""
    n = 100_000
    node = node_factory(capacity="40MiB", args=["--lease-budget", "40MiB"])
    with node.client(timeout_s=30) as c, node.client() as c2, node.client() as other:
        keys = [b"l/%06d" % i for i in range(n)]
        for i in range(0, n, 1000):
            assert c.put(keys[i : i + 1000], [b"v" * 256] * 1000) == [Status.OK] * 1000
            got = (c if i % 2000 else c2).lookup(keys[i : i + 1000], lease_ttl_s=300)  # two lessees: 65,536 records each at most
            assert all(got.lease_ids)
        assert node.metric("memkv_node_leases") == n
        unleased = _fill(c, 14, prefix=b"free")  # the rest of the arena, evictable
        assert node.metric("memkv_node_evictions_total") == 0
        started = time.perf_counter()
        assert c.put([b"new/%02d" % i for i in range(16)], [b"n" * MiB] * 16) == [Status.OK] * 16
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        assert other.exists(keys[:512]) == [256] * 512
        exists_s = time.perf_counter() - started
        assert node.metric("memkv_node_evictions_total") >= 2
        assert _present(c, unleased) < 14
        print(f"\n16 x 1 MiB PUT that evicts, with {n} leased entries: {put_s * 1000:.0f} ms; EXISTS of 512: {exists_s * 1000:.0f} ms")
        assert put_s < 1.0 and exists_s < 1.0


def test_a_keyed_client_is_served_while_a_keyless_flood_runs(node_factory: NodeFactory) -> None:
    """Hundreds of connections that never authenticate, from other loopback addresses: they fill
    only the unauthenticated budget (per address and in all; the oldest gives way) and time out,
    while a keyed client connects and is served throughout. Before the fix unauthenticated
    connections shared --max-connections with real clients and a flood locked them out."""
    node = node_factory(
        capacity="16MiB",
        env=ENV,
        args=["--max-connections", "64", "--max-unauth-connections", "16", "--max-unauth-per-host", "4", "--auth-timeout", "1"],
    )
    stop = threading.Event()
    opened = [0]
    refused = [0]

    def flood(source: str) -> None:
        socks: list[socket.socket] = []
        try:
            while not stop.is_set() and opened[0] < 2000:
                try:
                    s = socket.socket()
                    s.bind((source, 0))
                    s.settimeout(1)
                    s.connect(node.address)
                    socks.append(s)
                    opened[0] += 1
                except OSError:
                    refused[0] += 1
                    time.sleep(0.01)
        finally:
            for s in socks:
                s.close()

    flooders = [threading.Thread(target=flood, args=(f"127.0.0.{i}",), daemon=True) for i in range(2, 8)]
    for t in flooders:
        t.start()
    served = 0
    try:
        time.sleep(0.5)  # the flood is under way
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with NodeClient(node.data, key=KEY, timeout_s=2.0) as c:  # a new connection each time
                assert c.put([b"k"], [b"v" * 1000]) == [Status.OK]
                assert c.get_into([b"k"], [bytearray(1000)]) == [1000]
                served += 1
    finally:
        stop.set()
        for t in flooders:
            t.join(10)
    assert opened[0] > 64, "the flood did not get going"
    rejected = node.metric("memkv_node_protocol_errors_total", reason="too_many_connections")
    evicted = node.metric("memkv_node_protocol_errors_total", reason="unauth_evicted")
    print(f"\nflood: {opened[0]} connections opened; node refused {rejected:.0f}, pushed out {evicted:.0f}; keyed client served {served} times")
    assert served >= 5 and rejected + evicted > 0


def test_a_flood_pushes_out_its_own_handshakes_not_a_slow_real_client(node_factory: NodeFactory) -> None:
    """The unauthenticated budget is full and a flood from six addresses keeps coming while a real
    client (another address, one pending connection) is slow to answer HELLO, as on a busy host:
    the flood's own oldest connections give way, and the client's AUTH still lands."""
    node = node_factory(
        capacity="16MiB", env=ENV,
        args=["--max-unauth-connections", "16", "--max-unauth-per-host", "4", "--auth-timeout", "10"],
    )  # fmt: skip
    slow = socket.create_connection(node.address, timeout=5)
    flood: list[socket.socket] = []
    try:
        _, hello, _ = rawwire.read_frame(slow)
        assert isinstance(hello, Hello)
        for i in range(5 * 6):  # twice the budget: every slot turns over
            s = socket.socket()
            flood.append(s)
            s.bind((f"127.0.0.{2 + i % 6}", 0))
            s.settimeout(5)
            s.connect(node.address)
        wait_until(
            "the flood to push out handshakes",
            lambda: node.metric("memkv_node_protocol_errors_total", reason="unauth_evicted") >= 8,
            5.0,
        )
        slow.sendall(rawwire.auth_frame(hello, KEY))
        _, ok, _ = rawwire.read_frame(slow)
        assert isinstance(ok, AuthOk), ok
    finally:
        slow.close()
        for s in flood:
            s.close()


def test_a_real_client_opening_two_connections_is_not_the_busiest_address(node_factory: NodeFactory) -> None:
    """A flood of one pending handshake per address is not told apart from clients: the oldest
    overall gives way, not a client that happens to have two connections opening at once."""
    node = node_factory(capacity="16MiB", env=ENV, args=["--max-unauth-connections", "4", "--auth-timeout", "30"])
    opened: list[socket.socket] = []

    def pending(source: str) -> tuple[socket.socket, Hello]:
        s = socket.socket()
        opened.append(s)
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(node.address)
        _, hello, _ = rawwire.read_frame(s)  # not answered yet
        assert isinstance(hello, Hello)
        return s, hello

    try:
        oldest, _ = pending("127.0.0.3")
        pending("127.0.0.4")
        client = [pending("127.0.0.2"), pending("127.0.0.2")]
        pending("127.0.0.5")  # the budget is full: one gives way
        wait_until("one pushed out", lambda: node.metric("memkv_node_protocol_errors_total", reason="unauth_evicted") >= 1, 5.0)
        rawwire.assert_closed(oldest)
        for s, hello in client:  # both of the client's connections authenticate
            s.sendall(rawwire.auth_frame(hello, KEY))
            _, ok, _ = rawwire.read_frame(s)
            assert isinstance(ok, AuthOk), ok
    finally:
        for s in opened:
            s.close()


def test_hello_announces_the_limits_a_client_splits_by(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="16MiB", args=["--max-frame-payload", "2MiB", "--max-batch", "8"])
    sock = socket.create_connection(node.address, timeout=5)
    try:
        _, hello, _ = rawwire.read_frame(sock)
        assert isinstance(hello, Hello) and (hello.max_payload_len, hello.max_batch) == (2 * MiB, 8)
    finally:
        sock.close()
    with node.client() as c:  # 10 MiB in 20 values: split into requests the node accepts
        assert c.put([b"s/%02d" % i for i in range(20)], [b"s" * (MiB // 2)] * 20) == [Status.OK] * 20
    # A request is counted once its answer is out: the last one may be counted just after the client has it.
    wait_until("5 PUT requests counted", lambda: node.metric("memkv_node_ops_total", op="put", outcome="ok") >= 5, 5.0)


def test_idle_and_unauthenticated_connections_are_closed_on_their_deadlines(node_factory: NodeFactory) -> None:
    node = node_factory(capacity="8MiB", env=ENV, args=["--idle-timeout", "0.5", "--auth-timeout", "0.5"])
    silent = socket.create_connection(node.address, timeout=5)  # never authenticates
    idle = rawwire.connect(node.address, key=KEY)  # authenticates, then says nothing
    try:
        time.sleep(1.2)
        _, hello, _ = rawwire.read_frame(silent)
        assert isinstance(hello, Hello)
        assert "frame not completed in time" in rawwire.expect_error(silent).message
        rawwire.assert_closed(idle)
    finally:
        silent.close()
        idle.close()
    with NodeClient(node.data, key=KEY) as c:  # a pooled connection that went idle is replaced
        assert c.ping() > 0
        time.sleep(0.8)
        assert c.ping() > 0
