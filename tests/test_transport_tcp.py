"""Socket helpers over real socket pairs: gathered partial sends, exact reads, deadlines, lingering close."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from lmcache_memkv.errors import MemKVTimeout
from lmcache_memkv.transport import tcp


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):  # small buffers force partial sends
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _reader(sock: socket.socket, n: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        buf = bytearray(n)
        tcp.recv_into_exact(sock, memoryview(buf), time.monotonic() + 10)
        out.append(bytes(buf))

    t = threading.Thread(target=run)
    t.start()
    return t


def test_send_views_resumes_partial_sends_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    parts: list[bytes | bytearray | memoryview] = [os.urandom(n) for n in (1, 0, 70_000, 3, 0, 250_000, 17)]
    parts.append(memoryview(bytearray(os.urandom(4096))).cast("B", (64, 64)))  # 2-D buffers go out flat
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    out: list[bytes] = []
    t = _reader(b, len(expected), out)
    tcp.send_views(a, parts, time.monotonic() + 10)
    t.join(10)
    assert out == [expected]


def test_send_views_polled_waits_when_the_socket_is_full_and_resumes_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    parts: list[bytes | bytearray | memoryview] = [os.urandom(n) for n in (1, 0, 70_000, 3, 250_000, 17)]
    parts += [bytes([i % 256]) * 7 for i in range(1500)]  # beyond IOV_MAX too
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    out: list[bytes] = []
    waits = [0]
    full = threading.Event()

    def reader() -> None:  # starts once the sender found the socket full, so it must wait
        full.wait(10)
        buf = bytearray(len(expected))
        tcp.recv_into_exact(b, memoryview(buf), time.monotonic() + 10)
        out.append(bytes(buf))

    def wait() -> None:  # what a mover's wait does: sleep until writable
        waits[0] += 1
        full.set()
        assert select.select([], [a], [], 10)[1], "never writable"

    a.setblocking(False)
    t = threading.Thread(target=reader)
    t.start()
    tcp.send_views_polled(a, parts, wait)
    t.join(10)
    assert out == [expected]
    assert 1 <= waits[0] < len(expected) // 1024  # it waited, and did not spin through the waits


def test_send_views_beyond_iov_max(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    parts = [bytes([i % 256]) * 7 for i in range(3000)]
    out: list[bytes] = []
    t = _reader(b, 7 * 3000, out)
    tcp.send_views(a, parts, None)
    t.join(10)
    assert out == [b"".join(parts)]


def test_recv_into_exact_times_out_and_reports_progress(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"abc")
    started = time.monotonic()
    with pytest.raises(MemKVTimeout, match="after receiving 3 of 10 bytes"):
        tcp.recv_into_exact(b, memoryview(bytearray(10)), time.monotonic() + 0.2)
    assert time.monotonic() - started < 2
    with pytest.raises(MemKVTimeout, match="deadline passed"):
        tcp.recv_into_exact(b, memoryview(bytearray(1)), time.monotonic() - 1)


def test_recv_reports_peer_close(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"xy")
    a.close()
    with pytest.raises(tcp.PeerClosed, match="after 2 of 5 bytes"):
        tcp.recv_exact(b, 5, None)


def test_send_times_out_against_a_stalled_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    with pytest.raises(MemKVTimeout, match="sending"):
        tcp.send_views(a, [bytes(1 << 22)], time.monotonic() + 0.2)


def test_drain_discards_exactly(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    t = threading.Thread(target=a.sendall, args=(b"x" * 10_000 + b"tail",))
    t.start()
    tcp.drain(b, 10_000, memoryview(bytearray(333)), time.monotonic() + 5)
    assert tcp.recv_exact(b, 4, time.monotonic() + 5) == b"tail"
    t.join(5)


def test_linger_close_lets_the_peer_read_what_was_sent_last() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        client.sendall(b"u" * 100_000)  # unread input: a plain close() would answer with RST
        server.sendall(b"error frame")
        t = threading.Thread(target=tcp.linger_close, args=(server, 2.0, 1 << 20))
        t.start()
        client.shutdown(socket.SHUT_WR)
        assert tcp.recv_exact(client, 11, time.monotonic() + 5) == b"error frame"
        assert client.recv(1) == b""
        t.join(5)
        assert server.fileno() == -1
    finally:
        client.close()
        listener.close()


def test_linger_close_is_bounded_by_time() -> None:
    a, b = socket.socketpair()
    try:
        started = time.monotonic()
        tcp.linger_close(a, 0.2, 1 << 20)  # the peer neither sends nor closes
        assert time.monotonic() - started < 2
        assert a.fileno() == -1
    finally:
        b.close()


def test_tune_sets_nodelay() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    s = socket.create_connection(listener.getsockname())
    try:
        tcp.tune(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        s.close()
        listener.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real loopback TCP connection: the low-water mark is a TCP matter."""
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _queued(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_await_queued_wakes_once_the_bytes_are_in_and_leaves_them(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    data = os.urandom(300 << 10)

    def trickle() -> None:
        for i in range(0, len(data), 30 << 10):
            a.sendall(data[i : i + (30 << 10)])
            time.sleep(0.02)

    t = threading.Thread(target=trickle)
    t.start()
    tcp.await_queued(b, len(data), time.monotonic() + 10)
    # Not woken by the first slice that landed (the kernel may wake it before the last one,
    # when the receive window it has opened so far is full).
    assert _queued(b) >= 2 * (30 << 10)
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert tcp.recv_exact(b, len(data), time.monotonic() + 5) == data  # nothing consumed
    t.join(5)


def test_await_queued_returns_on_eof_and_at_the_deadline(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    started = time.monotonic()
    tcp.await_queued(b, 1 << 20, time.monotonic() + 0.2)  # nothing comes: back at the deadline
    assert 0.15 < time.monotonic() - started < 5
    a.sendall(b"x" * 1000)
    a.close()
    started = time.monotonic()
    tcp.await_queued(b, 1 << 20, time.monotonic() + 30)  # EOF: the rest can never come
    assert time.monotonic() - started < 5
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    with pytest.raises(tcp.PeerClosed, match="after 1000 of 1001 bytes"):
        tcp.recv_exact(b, 1001, time.monotonic() + 5)


def test_await_queued_returns_when_the_window_is_full(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the bytes wanted cannot all be queued
    data = os.urandom(4 << 20)
    t = threading.Thread(target=a.sendall, args=(data,))
    t.start()
    started = time.monotonic()
    tcp.await_queued(b, len(data), time.monotonic() + 30)
    assert time.monotonic() - started < 5
    assert tcp.recv_exact(b, len(data), time.monotonic() + 10) == data
    t.join(10)


def test_poll_queued_says_whether_the_bytes_came_and_restores_the_mark(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """The node's PUT reader waits for the rest of a value with it: False at the deadline (the
    request then times out), True once the bytes are in; the low-water mark is back at 1 byte
    either way, or the event loop would not wake for the connection's next small request."""
    a, b = tcp_pair
    poller = select.poll()
    poller.register(b, select.POLLIN)
    a.sendall(b"x" * 1000)
    assert not tcp.poll_queued(b, poller, 100_000, time.monotonic() + 0.2)  # 1,000 of 100,000 bytes
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    a.sendall(b"y" * 99_000)
    assert tcp.poll_queued(b, poller, 100_000, time.monotonic() + 10)
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert _queued(b) == 100_000
