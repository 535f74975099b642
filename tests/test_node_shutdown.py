"""SIGTERM: stop accepting, finish what is in flight (pipelined requests included), exit 0."""

from __future__ import annotations

import signal
import socket
import time

import pytest
import rawwire
from nodeproc import NodeFactory, NodeProcess

from lmcache_memkv.client import NodeClient
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import ErrorCode, Status
from lmcache_memkv.wire.messages import ErrorFrame, PingRequest, PingResponse, PutRequest, PutResponse, encode


def wait_refused(node: NodeProcess, timeout_s: float = 10.0) -> None:
    # run_node stops accepting first thing on SIGTERM; the bound is for a loaded box.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(node.address, timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):  # reset: caught between shutdown and close
            return
        time.sleep(0.05)
    pytest.fail("node still accepts connections after SIGTERM")


def test_sigterm_when_idle_exits_zero(node_factory: NodeFactory) -> None:
    node = node_factory()
    with node.client() as c:
        c.put([b"k"], [b"v"])  # leaves an idle pooled connection open
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.wait(10) == 0
    assert time.monotonic() - started < 3
    assert "stopped (drained)" in node.log()


def test_sigterm_finishes_a_request_in_flight(node_factory: NodeFactory) -> None:
    node = node_factory()
    value = bytes(range(256)) * (32 << 12)  # 8 MiB
    sock = rawwire.connect(node.address, timeout_s=10)
    try:
        sock.sendall(encode(PutRequest(keys=[b"inflight"], sizes=[len(value)], versions=CLOCK.next(1)), 42) + value[: len(value) // 2])
        time.sleep(0.1)
        node.signal(signal.SIGTERM)
        wait_refused(node)  # no new connections ...
        assert node.alive()  # ... but the request that started is still being served
        sock.sendall(value[len(value) // 2 :])
        header, reply, _ = rawwire.read_frame(sock)
        assert header.request_id == 42 and reply == PutResponse(statuses=[Status.OK])
        # Then the node says why it hangs up, and goes.
        _, bye, _ = rawwire.read_frame(sock)
        assert isinstance(bye, ErrorFrame) and bye.code == ErrorCode.SHUTTING_DOWN
    finally:
        sock.close()
    assert node.wait(10) == 0


def test_sigterm_answers_requests_pipelined_behind_the_one_in_flight(node_factory: NodeFactory) -> None:
    node = node_factory()
    value = b"p" * (4 << 20)
    sock = rawwire.connect(node.address, timeout_s=10)
    try:
        # A PUT is in flight when SIGTERM comes; its remaining bytes arrive with three pings behind them.
        sock.sendall(encode(PutRequest(keys=[b"slow"], sizes=[len(value)], versions=CLOCK.next(1)), 1) + value[:1000])
        time.sleep(0.1)
        node.signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(value[1000:] + b"".join(encode(PingRequest(data=b"%d" % i), 10 + i) for i in range(3)))
        answers = [rawwire.read_frame(sock)[:2] for _ in range(4)]
        assert [h.request_id for h, _ in answers] == [1, 10, 11, 12]
        assert answers[0][1] == PutResponse(statuses=[Status.OK])
        assert [m for _, m in answers[1:]] == [PingResponse(data=b"%d" % i) for i in range(3)]
    finally:
        sock.close()
    assert node.wait(10) == 0


def test_stop_accepting_is_immediate_and_keeps_serving_open_connections() -> None:
    server = NodeServer(NodeConfig(listen="127.0.0.1:0", capacity=1 << 20))
    server.start()
    try:
        with NodeClient(server.endpoint) as c:
            c.put([b"k"], [b"v"])  # one pooled connection stays open
            started = time.monotonic()
            server.stop_accepting()
            assert time.monotonic() - started < 0.5
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(server.address, timeout=1).close()
            assert c.exists([b"k"]) == [1]  # the open connection carries on
            server.stop_accepting()  # idempotent
    finally:
        assert server.stop(2.0)
