"""memkv's verbs data path on a real device: a node (in this process, data and control planes) and
the RDMA data client. PUT and GET byte-exact with the node's RDMA byte counters showing the value
bytes moved by verbs (TCP's stay at zero); a request naming memory outside the client's registered
region is refused; a load that times out is fenced: a WRITE the node posts late cannot land in
the page after the load reported; a node that dies mid-transfer costs errors (misses) within the
timeout, never a hang.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lmcache_memkv.client.node_client import NodeClient
from lmcache_memkv.client.rdma_client import RdmaDataClient, RdmaSide
from lmcache_memkv.control.channel import ChannelPool
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.node_service import ControlPlane, start_control_plane
from lmcache_memkv.errors import MemKVError, MemKVTimeout, ServerError
from lmcache_memkv.node import movers
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.transport.rdma import buffer_address
from lmcache_memkv.wire.constants import ErrorCode, Status
from lmcache_memkv.wire.messages import RdmaPutRequest

KEY = bytes(range(32))
PAGE = 16 << 10  # small values: soft-RoCE under emulation moves tens of MiB/s
POOL = 64 * PAGE


@dataclass
class Node:
    server: NodeServer
    plane: ControlPlane
    stopped: bool = False

    @property
    def member(self) -> Member:
        return self.plane.membership.local

    def counter(self, transport: str, direction: str) -> float:
        m = self.server.metrics.transport_bytes.labels(self.server.config.node_id, transport, direction)
        return float(m._value.get())

    def counter_reaches(self, transport: str, direction: str, expected: float, within_s: float = 5.0) -> float:
        """The counter once it reaches ``expected`` (or the deadline passes): a request is counted
        after its answer is out, so the client can hold the answer before the count moves."""
        deadline = time.monotonic() + within_s
        while (value := self.counter(transport, direction)) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.plane.stop()
            self.server.stop(0)


@pytest.fixture
def node(rdma_device: str, rdma_gid_index: int) -> Iterator[Node]:
    config = NodeConfig(
        listen="127.0.0.1:0", control_listen="127.0.0.1:0", capacity=4 << 20, node_id="rdma-node", auth_key=KEY,
        rdma_device=rdma_device, rdma_gid_index=rdma_gid_index,
    )  # fmt: skip
    server = NodeServer(config)
    server.start()
    try:
        plane = start_control_plane(server, config)
    except BaseException:
        server.stop(0)
        raise
    n = Node(server, plane)
    try:
        yield n
    finally:
        movers._FAULTS.delay_s = 0.0
        n.stop()


@pytest.fixture
def pool() -> Iterator[mmap.mmap]:
    """The client's buffer pool (LMCache's L1 in production), registered once."""
    m = mmap.mmap(-1, POOL)
    yield m
    try:
        m.close()
    except BufferError:
        pass  # a test's page views still alive: the mapping goes with them


@pytest.fixture
def side(pool: mmap.mmap, rdma_device: str, rdma_gid_index: int) -> Iterator[RdmaSide]:
    addr, length = buffer_address(pool)
    s = RdmaSide(rdma_device, 1, rdma_gid_index, addr, length)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def client(node: Node, side: RdmaSide) -> Iterator[RdmaDataClient]:
    channels = ChannelPool(KEY)
    c = RdmaDataClient(node.member, KEY, 20.0, os.urandom(16), side, channels)  # generous: the guest is slow
    try:
        yield c
    finally:
        c.close()
        channels.close()


def pages(pool: mmap.mmap, first: int, n: int) -> list[memoryview]:
    view = memoryview(pool)
    return [view[(first + i) * PAGE : (first + i + 1) * PAGE] for i in range(n)]


def test_node_advertises_rdma(node: Node) -> None:
    assert node.member.transports == ("rdma", "tcp")


def test_put_and_get_byte_exact_over_verbs(node: Node, client: RdmaDataClient, pool: mmap.mmap) -> None:
    src = pages(pool, 0, 4)
    for i, page in enumerate(src):
        page[:] = os.urandom(PAGE) if i else bytes(PAGE)  # one all-zero value too
    keys = [f"k{i}".encode() for i in range(4)]
    assert client.put(keys, src) == [Status.OK] * 4
    dst = pages(pool, 8, 5)
    for page in dst:
        page[:] = b"\xee" * PAGE
    reply = client.read_into([*keys, b"absent"], dst, exact=True)
    assert list(reply.statuses) == [Status.OK] * 4 + [Status.MISS]
    for a, b in zip(src, dst, strict=False):
        assert a.tobytes() == b.tobytes()
    assert dst[4].tobytes() == b"\xee" * PAGE  # a miss writes nothing
    # Every value byte moved by verbs, none over the socket.
    assert node.counter_reaches("rdma", "in", 4 * PAGE) == 4 * PAGE
    assert node.counter_reaches("rdma", "out", 4 * PAGE) == 4 * PAGE
    assert node.counter("tcp", "in") == node.counter("tcp", "out") == 0
    # Leases, lookups and deletes ride the TCP socket as before.
    assert client.lookup(keys[:1], lease_ttl_s=5).statuses[0] == Status.OK


def test_remote_range_outside_the_registered_region_is_refused(node: Node, client: RdmaDataClient, pool: mmap.mmap) -> None:
    src = pages(pool, 0, 1)
    src[0][:] = b"x" * PAGE
    assert client.put([b"ok"], src) == [Status.OK]  # sets up the session
    assert client._session is not None
    session = client._session[0]
    region = client._side.region
    tcp = NodeClient(node.member.data_endpoint, KEY, 5.0, client.client_id)
    try:
        with pytest.raises(ServerError) as info, tcp.connection("hostile RPUT", 5.0) as (conn, deadline):
            conn.call(RdmaPutRequest(session=session, keys=[b"evil"], sizes=[PAGE], versions=[1],
                                     addrs=[region.addr + region.length - 8], rkeys=[region.rkey]), deadline)  # fmt: skip
        assert info.value.code == ErrorCode.BAD_FRAME
        with pytest.raises(ServerError) as info, tcp.connection("foreign RPUT", 5.0) as (conn, deadline):
            conn.call(RdmaPutRequest(session=session ^ 1, keys=[b"evil"], sizes=[8], versions=[1],
                                     addrs=[region.addr], rkeys=[region.rkey]), deadline)  # fmt: skip
        assert info.value.code == ErrorCode.NO_SESSION
    finally:
        tcp.close()
    with pytest.raises(ValueError, match="outside the registered"):
        client.put([b"k"], [bytearray(8)])  # not in the pool: never sent


def test_timed_out_load_is_fenced_and_a_late_write_never_lands(node: Node, client: RdmaDataClient, pool: mmap.mmap) -> None:
    src = pages(pool, 0, 1)
    src[0][:] = b"v" * PAGE
    assert client.put([b"late"], src) == [Status.OK]
    dst = pages(pool, 4, 1)
    dst[0][:] = b"\x00" * PAGE
    movers._FAULTS.delay_s = 2.0  # the node posts its WRITE two seconds late
    started = time.monotonic()
    with pytest.raises(MemKVTimeout):
        client.read_into([b"late"], dst, timeout_s=0.5, exact=True)
    reported = time.monotonic() - started
    assert reported < 1.5, reported  # the load reported within its timeout (plus the fence)
    time.sleep(4.0)  # the late WRITE has been posted and failed against our fenced queue pair
    assert dst[0].tobytes() == b"\x00" * PAGE, "a late RDMA WRITE landed after the load reported"
    fences = node.server.metrics.rdma_fences.labels(node.server.config.node_id)
    until = time.monotonic() + 20  # the node's WRITE fails after its retries, or its frame deadline passes
    while fences._value.get() < 1 and time.monotonic() < until:
        time.sleep(0.2)
    assert fences._value.get() >= 1  # the node fenced its side too before unpinning the extent
    assert dst[0].tobytes() == b"\x00" * PAGE
    movers._FAULTS.delay_s = 0.0
    reply = client.read_into([b"late"], dst, exact=True)  # a new session is set up on its own
    assert reply.statuses[0] == Status.OK and dst[0].tobytes() == b"v" * PAGE


def test_node_dying_mid_transfer_costs_an_error_within_the_timeout(node: Node, client: RdmaDataClient, pool: mmap.mmap) -> None:
    src = pages(pool, 0, 2)
    for page in src:
        page[:] = os.urandom(PAGE)
    assert client.put([b"a", b"b"], src) == [Status.OK] * 2
    dst = pages(pool, 10, 2)
    dst[0][:] = dst[1][:] = bytes(PAGE)
    movers._FAULTS.delay_s = 1.0  # the transfer is under way when the node goes
    killer = threading.Timer(0.3, node.stop)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(MemKVError):
            client.read_into([b"a", b"b"], dst, timeout_s=3.0, exact=True)
    finally:
        killer.join()
    assert time.monotonic() - started < 4.0
    time.sleep(1.5)
    assert dst[0].tobytes() == bytes(PAGE) and dst[1].tobytes() == bytes(PAGE)  # nothing landed: a miss, not a torn page
