"""The client's GET body reader against a scripted node: values that arrive in pieces of any
size land whole in their own buffers; a node that sends more than a buffer holds, or hangs up
mid-value, is an error, and no buffer is written past its value."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from rawwire import read_frame

from lmcache_memkv.client import NodeClient
from lmcache_memkv.errors import ConnectError, MemKVTimeout, ProtocolError
from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import GetRequest, GetResponse, encode
from lmcache_memkv.wire.state import ServerProtocol

Script = Callable[[socket.socket, int, GetRequest], None]  # (socket, request id, the GET) -> answers it


def _serve(listener: socket.socket, script: Script) -> None:
    conn, _ = listener.accept()
    with conn:
        proto = ServerProtocol("scripted", None)
        conn.sendall(proto.hello())
        header, msg, _ = read_frame(conn)
        conn.sendall(proto.on_auth(header, msg))
        header, msg, _ = read_frame(conn)
        assert isinstance(msg, GetRequest)
        try:
            script(conn, header.request_id, msg)
            conn.recv(1)  # until the client hangs up
        except OSError:
            pass  # the client hung up first (it refused the answer)


@pytest.fixture
def node() -> Iterator[Callable[[Script], str]]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        t = threading.Thread(target=_serve, args=(listener, script), daemon=True)
        t.start()
        threads.append(t)
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()
    for t in threads:
        t.join(5)


def _answer(values: list[bytes | None], pieces: list[int], lengths: list[int] | None = None, cut: int | None = None) -> Script:
    """Answer OK for each value (MISS for None), then send the bodies in pieces of these sizes
    (cycled), pausing between pieces; ``cut``: hang up after that many body bytes."""

    def script(conn: socket.socket, rid: int, req: GetRequest) -> None:
        statuses = [Status.MISS if v is None else Status.OK for v in values]
        lens = lengths or [0 if v is None else len(v) for v in values]
        conn.sendall(encode(GetResponse(statuses=statuses, lengths=lens, versions=[1] * len(values)), rid))
        body = b"".join(v for v in values if v is not None)
        if cut is not None:
            body = body[:cut]
        at, i = 0, 0
        while at < len(body):
            n = pieces[i % len(pieces)]
            conn.sendall(body[at : at + n])
            at, i = at + n, i + 1
            time.sleep(0.001)
        if cut is not None:
            conn.shutdown(socket.SHUT_WR)

    return script


@pytest.mark.parametrize("pieces", [[1, 1, 2, 4093], [7, 3000], [1 << 20], [5000, 1, 1, 70000]])
def test_values_arriving_in_any_pieces_land_in_their_own_buffers(node: Callable[[Script], str], pieces: list[int]) -> None:
    values = [os.urandom(n) for n in (1000, 0, 9000, 1)] + [None, os.urandom(65536)]
    endpoint = node(_answer(values, pieces))
    buffers = [bytearray(b"\xee" * 70000) for _ in values]
    with NodeClient(endpoint, timeout_s=5) as client:
        reply = client.read_into([f"k{i}".encode() for i in range(len(values))], buffers)
    assert list(reply.statuses) == [Status.MISS if v is None else Status.OK for v in values]
    for value, buf in zip(values, buffers, strict=True):
        n = 0 if value is None else len(value)
        assert bytes(buf[:n]) == (value or b"")
        assert buf[n:] == b"\xee" * (70000 - n)  # nothing past the value


def test_a_value_larger_than_its_buffer_is_refused_before_any_byte_is_read(node: Callable[[Script], str]) -> None:
    values = [b"a" * 10, b"b" * 20]
    endpoint = node(_answer(values, [4]))
    buffers = [bytearray(b"\xee" * 10), bytearray(b"\xee" * 19)]
    with NodeClient(endpoint, timeout_s=5) as client, pytest.raises(ProtocolError, match="20 bytes for a 19-byte buffer"):
        client.read_into([b"k0", b"k1"], buffers)
    assert buffers == [bytearray(b"\xee" * 10), bytearray(b"\xee" * 19)]


def test_exact_refuses_a_shorter_value(node: Callable[[Script], str]) -> None:
    endpoint = node(_answer([b"a" * 10], [4]))
    with NodeClient(endpoint, timeout_s=5) as client, pytest.raises(ProtocolError, match="10 bytes for a 16-byte buffer"):
        client.read_into([b"k0"], [bytearray(16)], exact=True)


def test_a_node_hanging_up_mid_value_is_a_connect_error(node: Callable[[Script], str]) -> None:
    values = [b"a" * 100, b"b" * 100]
    endpoint = node(_answer(values, [30], cut=150))
    buffers = [bytearray(100), bytearray(100)]
    with NodeClient(endpoint, timeout_s=5) as client, pytest.raises(ConnectError, match="after 150 of 200 value bytes"):
        client.read_into([b"k0", b"k1"], buffers)


def test_a_node_that_stalls_mid_value_times_out(node: Callable[[Script], str]) -> None:
    def stall(conn: socket.socket, rid: int, req: GetRequest) -> None:
        conn.sendall(encode(GetResponse(statuses=[Status.OK], lengths=[100], versions=[1]), rid))
        conn.sendall(b"x" * 40)
        time.sleep(1.5)

    endpoint = node(stall)
    with NodeClient(endpoint, timeout_s=0.5) as client, pytest.raises(MemKVTimeout, match="40 of 100 value bytes"):
        client.read_into([b"k0"], [bytearray(100)])
