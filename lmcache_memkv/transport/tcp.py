"""Socket helpers: exact reads into caller buffers and gathered writes, with deadlines.

Value bytes never pass through a Python ``bytes`` object: reads land in the caller's
buffer with ``recv_into`` and writes gather memoryviews with ``sendmsg``.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import sys
import termios
import time
from collections.abc import Callable, Sequence

from lmcache_memkv.errors import MemKVTimeout, ProtocolError
from lmcache_memkv.wire.frames import Header
from lmcache_memkv.wire.messages import Message
from lmcache_memkv.wire.reader import FrameReader

Buffer = bytes | bytearray | memoryview
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_POLL_MAX_MS = (1 << 31) - 1  # poll() takes a C int
_GATHER_MAX = 1 << 20  # the most a receiver waits to have queued: more, and a lone sender stalls on a full window


class PeerClosed(ConnectionError):
    """The peer closed the connection."""


def tune(sock: socket.socket) -> None:
    """No Nagle: frames are latency-bound, payloads bandwidth-bound.

    Buffer sizes are left to the kernel on purpose: setting SO_RCVBUF/SO_SNDBUF turns off
    TCP autotuning, and where ``net.core.[rw]mem_max`` has its default (about 208 KiB) the
    request is silently clamped, which caps a fast link far below its speed. Measured on
    loopback here, autotuned buffers were as fast as or faster than fixed 4 MiB ones.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _arm(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MemKVTimeout("deadline passed")
    sock.settimeout(remaining)


def recv_into_exact(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill ``view`` completely from ``sock``."""
    got = 0
    total = len(view)
    while got < total:
        _arm(sock, deadline)
        try:
            n = sock.recv_into(view[got:], total - got)
        except TimeoutError:
            raise MemKVTimeout(f"timed out after receiving {got} of {total} bytes") from None
        if n == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {total} bytes")
        got += n


def recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    """Read exactly ``n`` bytes of header or meta (small, bounded by the limits)."""
    buf = bytearray(n)
    if n:
        recv_into_exact(sock, memoryview(buf), deadline)
    return buf


def read_frame(sock: socket.socket, reader: FrameReader, deadline: float | None) -> tuple[Header, Message]:
    """Read one frame's header and meta through the shared sans-IO reader (payload left unread)."""
    while True:
        frame = reader.feed(recv_exact(sock, reader.next_size(), deadline))
        if frame is not None:
            return frame


def wait_for_data(sock: socket.socket, deadline: float | None) -> None:
    """Block until at least one byte can be read (PeerClosed on EOF), without consuming it.

    The node reserves arena space for a value only once its bytes start to arrive, so a peer
    that announces values and then stalls or hangs up makes the node evict nothing.
    """
    _arm(sock, deadline)
    try:
        if not sock.recv(1, socket.MSG_PEEK):
            raise PeerClosed("peer closed the connection before the value's bytes")
    except TimeoutError:
        raise MemKVTimeout("timed out waiting for a value's bytes") from None


def await_queued(sock: socket.socket, n: int, deadline: float | None) -> None:
    """Sleep until about ``n`` bytes (at most 1 MiB) are queued on ``sock``, not consuming them.

    Without this a reader that keeps up with its sender is woken for every segment that lands
    (64 KiB on loopback), a thread hand-over each; with the socket's low-water mark
    (``SO_RCVLOWAT``) raised to ``n`` for one poll it is woken once. The kernel also wakes it
    when the receive window is full, on EOF, and on error, so this never waits for bytes that
    cannot come; it returns at the deadline too (the reads that follow then time out), and the
    mark is back at 1 byte before it returns.
    """
    if min(n, _GATHER_MAX) <= 1:
        return
    p = select.poll()
    p.register(sock, select.POLLIN)
    poll_queued(sock, p, n, deadline)


def poll_queued(sock: socket.socket, poller: select.poll, n: int, deadline: float | None) -> bool:
    """``await_queued`` with the caller's poll object (``sock`` registered for POLLIN): True once
    about ``n`` bytes are queued (or the window is full, EOF, an error), False at the deadline."""
    want = min(n, _GATHER_MAX)
    remaining_ms = -1 if deadline is None else poll_ms(deadline)
    if want > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
    try:
        return bool(poller.poll(remaining_ms))
    finally:
        if want > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def queued(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (``FIONREAD``), read without consuming them."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder, signed=True)


def poll_ms(until: float) -> int:
    """``poll``'s timeout for a wait until ``until`` (monotonic), rounded up, within its int range."""
    return min(max(0, int((until - time.monotonic()) * 1000) + 1), _POLL_MAX_MS)


def drain(sock: socket.socket, n: int, scratch: memoryview, deadline: float | None) -> None:
    """Read and discard ``n`` bytes (a value we cannot keep), reusing ``scratch``."""
    while n > 0:
        chunk = scratch[: min(n, len(scratch))]
        recv_into_exact(sock, chunk, deadline)
        n -= len(chunk)


def send_views(sock: socket.socket, views: Sequence[Buffer], deadline: float | None) -> None:
    """Send every buffer in order with gathered writes, resuming after partial sends."""
    pending = _byte_views(views)
    while pending:
        _arm(sock, deadline)
        try:
            sent = sock.sendmsg(pending[:IOV_MAX])
        except TimeoutError:
            raise MemKVTimeout("timed out while sending") from None
        pending = advance(pending, sent)


def send_views_polled(sock: socket.socket, views: Sequence[Buffer], wait: Callable[[], None]) -> None:
    """``send_views`` on a non-blocking socket: ``wait()`` is called whenever the socket will take
    nothing more, and returns once it is writable again (or raises: it owns the deadline)."""
    pending = _byte_views(views)
    while pending:
        try:
            sent = sock.sendmsg(pending[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            wait()
            continue
        pending = advance(pending, sent)


def _byte_views(views: Sequence[Buffer]) -> list[memoryview]:
    return [m for m in (memoryview(v).cast("B") for v in views) if m.nbytes]


def advance(pending: list[memoryview], done: int) -> list[memoryview]:
    """Drop the views ``done`` bytes cover; keep the rest of a partly covered one (a gathered
    send or a scattered read that moved ``done`` bytes)."""
    i = 0
    while i < len(pending) and done >= len(pending[i]):
        done -= len(pending[i])
        i += 1
    rest = pending[i:]
    if done and rest:
        rest[0] = rest[0][done:]
    return rest


def linger_close(sock: socket.socket, timeout_s: float, max_bytes: int) -> None:
    """Half-close, then read and discard what the peer still sends, then close.

    Closing a socket with unread input makes the kernel answer with RST, which can
    overtake the error frame we just sent; reading a bounded amount first (HTTP servers
    call this a lingering close) lets the peer see why it was dropped.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout_s
        scratch = memoryview(bytearray(min(max_bytes, 64 << 10) or 1))
        while max_bytes > 0:
            _arm(sock, deadline)
            n = sock.recv_into(scratch)
            if n == 0:
                break
            max_bytes -= n
    except (OSError, MemKVTimeout):
        pass
    finally:
        sock.close()


def check_len(view: memoryview, expected: int, what: str) -> None:
    if view.nbytes != expected:
        raise ProtocolError(f"{what}: buffer is {view.nbytes} bytes, expected {expected}")
