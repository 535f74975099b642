"""RdmaDataClient never stalls past a call's deadline on its session lock or on a dead node's
Session.Hello (host-side: a fake queue pair, a real gRPC channel to a closed port)."""

from __future__ import annotations

import socket
import threading
import time
import types
from typing import Any

import pytest

from lmcache_memkv.client.rdma_client import RdmaDataClient
from lmcache_memkv.control.channel import ChannelPool
from lmcache_memkv.errors import ConnectError, MemKVTimeout
from lmcache_memkv.transport.rdma import QpInfo, Region


class FakeQP:
    def __init__(self) -> None:
        self.fenced = False
        self.closed = False
        self.info = QpInfo(qp_num=5, gid=b"\1" * 16, psn=1, mtu=3)

    def fence(self) -> bool:
        self.fenced = True
        return True

    def close(self) -> None:
        self.fence()
        self.closed = True


def client(control_endpoint: str = "127.0.0.1:1") -> RdmaDataClient:
    c = RdmaDataClient.__new__(RdmaDataClient)
    c.endpoint = "127.0.0.1:2"
    c.control_endpoint = control_endpoint
    c.client_id = b"c" * 16
    c.timeout_s = 5.0
    c._key = None
    c._side = types.SimpleNamespace(  # type: ignore[assignment]
        device=types.SimpleNamespace(create_qp=FakeQP), region=Region(addr=0x1000, length=4096, lkey=1, rkey=2)
    )
    c._channels = ChannelPool(None)
    c._session = None
    c._lock = threading.Lock()
    c._closed = False
    c._hello_backoff_s = 0.0
    c._hello_not_before = 0.0
    c._fallback = False
    c._tcp_until = 0.0
    c._proven = 0
    c._on_bytes = None
    return c


def test_a_session_set_up_elsewhere_does_not_hold_a_call_past_its_deadline() -> None:
    c = client()
    c._lock.acquire()  # another thread's Hello, stuck
    try:
        t0 = time.monotonic()
        with pytest.raises(MemKVTimeout):
            c._current(time.monotonic() + 0.2)
        assert time.monotonic() - t0 < 1.0
        # The fence still runs (it needs no lock) and returns by the deadline.
        qp: Any = FakeQP()
        t0 = time.monotonic()
        c._fence((1, qp), RuntimeError("x"), time.monotonic() + 0.2)
        assert qp.fenced and qp.closed and time.monotonic() - t0 < 1.0
    finally:
        c._lock.release()
        c._channels.close()


def test_hello_to_a_dead_node_fails_fast_not_at_the_deadline() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client(f"127.0.0.1:{port}")
    fenced: Any = FakeQP()
    fenced.fence()  # aborted under a call that then succeeded: nobody else closes it
    c._session = (1, fenced)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectError):
            c._current(time.monotonic() + 10.0)
        assert time.monotonic() - t0 < 5.0  # wait_for_ready would have waited all 10 s
        assert fenced.closed and c._session is None
    finally:
        c._channels.close()


# ---------------------------------------------------------------------- Session.Hello on the node


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: Any = None

    async def abort(self, code: Any, message: str) -> None:
        self.code = code
        raise Aborted(message)


def _hello_request() -> Any:
    from lmcache_memkv.proto.memkv.v1 import session_pb2

    return session_pb2.HelloRequest(
        client_id=(b"c" * 16).hex(),
        rdma_endpoint=session_pb2.RdmaEndpoint(gid=b"\1" * 16, qp_num=5, psn=1, mtu=3),
        memory_regions=[session_pb2.MemoryRegion(addr=0x1000, length=4096, rkey=2)],
    )


def test_hello_sets_up_the_queue_pair_off_the_event_loop() -> None:
    import asyncio

    from lmcache_memkv.control.service import SessionService
    from lmcache_memkv.proto.memkv.v1 import session_pb2

    threads: list[threading.Thread] = []

    class Sessions:
        def open(self, client_id: bytes, peer: QpInfo, region: Region) -> tuple[int, QpInfo]:
            threads.append(threading.current_thread())
            return 7, QpInfo(qp_num=9, gid=b"\2" * 16, psn=3, mtu=3)

    svc = SessionService(None, None, rdma=Sessions())  # type: ignore[arg-type]
    reply = session_pb2.HelloResponse()

    async def call() -> threading.Thread:
        await svc._rdma_session(_hello_request(), reply, FakeContext())
        return threading.current_thread()

    loop_thread = asyncio.run(call())
    assert threads and threads[0] is not loop_thread and reply.session_id == 7


def test_hello_after_the_node_closed_its_rdma_side_is_unavailable() -> None:
    import asyncio

    import grpc

    from lmcache_memkv.control.service import SessionService
    from lmcache_memkv.proto.memkv.v1 import session_pb2
    from lmcache_memkv.transport.rdma import RdmaError

    class Closed:
        def open(self, *a: Any) -> Any:
            raise RdmaError("the node is shutting down: no new RDMA sessions")

    ctx = FakeContext()
    svc = SessionService(None, None, rdma=Closed())  # type: ignore[arg-type]
    with pytest.raises(Aborted):
        asyncio.run(svc._rdma_session(_hello_request(), session_pb2.HelloResponse(), ctx))
    assert ctx.code is grpc.StatusCode.UNAVAILABLE


def test_abort_transfers_fences_the_session_without_the_lock() -> None:
    c = client()
    qp: Any = FakeQP()
    c._session = (1, qp)
    c._lock.acquire()  # a Hello under way elsewhere must not delay the abort
    try:
        c.abort_transfers()
        assert qp.fenced and not qp.closed  # the running call closes it when it fails
    finally:
        c._lock.release()
        c._channels.close()


def test_a_full_session_table_backs_off_instead_of_hammering_the_node() -> None:
    """RESOURCE_EXHAUSTED: the call fails (a miss, a failed store) and no Hello goes to that node
    before the back-off, which doubles per refusal."""
    import grpc

    from lmcache_memkv.client.rdma_client import HelloRefused

    c = client()
    hellos: list[float] = []

    def refuse(deadline: float) -> Any:
        hellos.append(time.monotonic())
        raise HelloRefused("all in use", grpc.StatusCode.RESOURCE_EXHAUSTED)

    c._hello = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(HelloRefused):
            c._current(time.monotonic() + 1)
        for _ in range(5):
            with pytest.raises(ConnectError, match="all in use; next try"):
                c._current(time.monotonic() + 1)
        assert len(hellos) == 1 and c._hello_backoff_s == 0.5
        c._hello_not_before = 0.0  # the back-off ran out
        with pytest.raises(HelloRefused):
            c._current(time.monotonic() + 1)
        assert len(hellos) == 2 and c._hello_backoff_s == 1.0
        # A success resets the back-off.
        c._hello_not_before = 0.0
        c._hello = lambda deadline: (7, FakeQP())  # type: ignore[method-assign,assignment,return-value]
        assert c._current(time.monotonic() + 1)[0] == 7 and c._hello_backoff_s == 0.0
    finally:
        c._channels.close()


def test_a_full_session_table_is_resource_exhausted_not_unavailable() -> None:
    import asyncio

    import grpc

    from lmcache_memkv.control.service import SessionService
    from lmcache_memkv.node.rdma import SessionsExhausted
    from lmcache_memkv.proto.memkv.v1 import session_pb2

    class Full:
        def open(self, *a: Any) -> Any:
            raise SessionsExhausted("all 4 RDMA sessions are in use")

    ctx = FakeContext()
    svc = SessionService(None, None, rdma=Full())  # type: ignore[arg-type]
    with pytest.raises(Aborted):
        asyncio.run(svc._rdma_session(_hello_request(), session_pb2.HelloResponse(), ctx))
    assert ctx.code is grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------- transport auto: TCP when verbs fail


class FakeTcp:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def put(self, keys: Any, values: Any, timeout_s: Any = None, versions: Any = None) -> list[int]:
        self.calls.append("put")
        return [0] * len(keys)

    def read_into(self, keys: Any, buffers: Any, timeout_s: Any = None, exact: bool = False) -> Any:
        self.calls.append("get")
        return "tcp-reply"


def _unroutable(c: RdmaDataClient, qps: list[Any]) -> list[int]:
    """Hello works; every transfer fails on the node (retry count exceeded: no route)."""
    from lmcache_memkv.errors import ServerError
    from lmcache_memkv.wire.constants import ErrorCode

    sessions = iter(range(100, 200))
    transfers: list[int] = []

    def hello(deadline: float) -> Any:
        qps.append(FakeQP())
        return next(sessions), qps[-1]

    c._hello = hello  # type: ignore[method-assign]
    c._fail = True  # type: ignore[attr-defined]

    def body(session: int, deadline: float) -> Any:
        transfers.append(session)
        if c._fail:  # type: ignore[attr-defined]
            raise ServerError("RDMA transfer failed: work request failed: status 12", ErrorCode.INTERNAL)
        return "rdma"

    c._body = body  # type: ignore[attr-defined]
    return transfers


@pytest.mark.parametrize("fallback", [True, False])
def test_transfers_failing_on_a_fresh_session_send_auto_to_tcp_for_a_while(fallback: bool) -> None:
    from lmcache_memkv.errors import ServerError

    c = client()
    c._fallback = fallback
    c._tcp = FakeTcp()  # type: ignore[assignment]
    qps: list[Any] = []
    transfers = _unroutable(c, qps)
    try:
        with pytest.raises(ServerError):
            c._run("x", None, c._body)  # type: ignore[attr-defined]
        assert qps[0].fenced
        if fallback:
            # Sticky: the next calls go over TCP without touching verbs.
            assert c.tcp_only()
            assert c.put([b"k"], [b"v"]) == [0] and c.read_into([b"k"], [bytearray(1)]) == "tcp-reply"
            assert c._tcp.calls == ["put", "get"] and transfers == [100]  # type: ignore[attr-defined]
            # After the back-off verbs are tried again; once a session works, its later
            # failures are ordinary ones (no switch to TCP).
            c._tcp_until = 0.0
            c._fail = False  # type: ignore[attr-defined]
            assert c._run("x", None, c._body) == "rdma" and not c.tcp_only()  # type: ignore[attr-defined]
            c._fail = True  # type: ignore[attr-defined]
            with pytest.raises(ServerError):
                c._run("x", None, c._body)  # type: ignore[attr-defined]
            assert not c.tcp_only()
        else:
            # transport rdma: never TCP; every call tries verbs again and fails (a miss).
            assert not c.tcp_only()
            with pytest.raises(ServerError):
                c._run("x", None, c._body)  # type: ignore[attr-defined]
            assert transfers == [100, 101]
    finally:
        c._channels.close()


def test_auto_goes_tcp_when_the_node_refuses_hello_as_unavailable() -> None:
    """The node's device is unusable (its poller died): Hello UNAVAILABLE, values over TCP."""
    import grpc

    from lmcache_memkv.client.rdma_client import HelloRefused

    c = client()
    c._fallback = True

    def refuse(deadline: float) -> Any:
        raise HelloRefused("device unusable", grpc.StatusCode.UNAVAILABLE)

    c._hello = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(HelloRefused):
            c._run("x", None, lambda s, d: None)
        assert c.tcp_only()
    finally:
        c._channels.close()
