"""Byte movers: execute a ``NodeCore`` plan over one transport.

A mover serves one connection at a time, on a worker thread, with blocking I/O bounded by the
request's deadline. The TCP mover reads each PUT value straight into its arena extent
(``recv_into``) and sends a GET's answer and values in gathered writes (``sendmsg`` of arena
views): no copies of value bytes in Python.

The RDMA mover uses the same seam: its PUT posts an RDMA READ from the client's registered page
(address and rkey from the request) into the view ``claim`` returns, waits for the completion,
then calls ``landed``; its GET posts RDMA WRITEs of ``views()`` into the client's pages and
waits for every completion before ``reply`` sends the answer, so a client never sees OK for
bytes that have not landed. A refused value costs it nothing (there are no bytes to drain).
Its answers go back on the connection's socket. A transfer that fails or runs out of time
fences the session's queue pair (ERR) before the plan gives its extents back, so no late READ
or WRITE can touch an extent that is reused. If the fence cannot confirm that (the flushed
completions did not come back in time), the plan's extents are quarantined: leaked, never reused.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from lmcache_memkv.errors import MemKVTimeout, ProtocolError
from lmcache_memkv.node.slots import TransferSlots
from lmcache_memkv.transport.tcp import (
    IOV_MAX,
    Buffer,
    PeerClosed,
    advance,
    poll_ms,
    poll_queued,
    queued,
    send_views,
    send_views_polled,
)
from lmcache_memkv.wire.constants import ErrorCode

if TYPE_CHECKING:
    from lmcache_memkv.node.core import GetPlan, PutPlan
    from lmcache_memkv.transport.rdma import QueuePair, Region
    from lmcache_memkv.wire.messages import RdmaGetRequest, RdmaPutRequest

_SCRATCH = 256 << 10  # discard buffer for values a PUT could not store
_GROUP_BYTES = 256 << 10  # the most a PUT reserves ahead of the value it reads (values that big go alone)
_GROUP_VALUES = 256  # and the most values it reads in one call (within IOV_MAX)
_GATHER_FROM = 256 << 10  # PUTs at least this large wait for their bytes to be queued before reading
_SLOT_FROM = 256 << 10  # transfers at least this large take a transfer slot (smaller ones never queue)
_QUANTUM = 0.02  # seconds a transfer may hold its slot while it waits on its peer (and nobody queues)
_GLANCE = 0.002  # while it so waits, how often it looks whether someone queued


class Mover(Protocol):
    def put(self, plan: PutPlan, deadline: float) -> None:
        """Bring each value into the view ``plan.claim(i)`` returns (or discard it when None),
        call ``plan.landed()`` once it is in, then send ``plan.answer()``."""
        ...

    def get(self, plan: GetPlan, deadline: float) -> None:
        """Deliver ``plan.views()`` to the client and answer with ``plan.head``."""
        ...

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        """Send an answer that carries no value bytes."""
        ...


class TcpMover:
    """Value bytes follow the request on the connection's socket, and follow the answer back.

    A transfer of ``_SLOT_FROM`` bytes or more runs holding one of the node's transfer slots
    (``slots.py``); smaller ones never queue behind them."""

    def __init__(self, sock: socket.socket, slots: TransferSlots) -> None:
        self.sock = sock
        self.slots = slots

    def put(self, plan: PutPlan, deadline: float) -> None:
        sock = self.sock
        # Non-blocking reads, polled only when the socket is empty: with a timeout set, Python
        # spends an ioctl and a poll on every read, and the values of a batch are usually in
        # the socket already (six system calls per value became two; grouped, a few a batch).
        sock.settimeout(0.0)
        total = sum(plan.sizes)
        turn = _Turn(sock, deadline, self.slots if total >= _SLOT_FROM else None)
        later = total  # bytes of the values after the one(s) being read
        scratch: list[memoryview] = []  # a discard buffer, made only when a value is refused
        try:
            if total >= _GATHER_FROM:
                # One wake-up once the batch is in (or the window is full), not one per segment,
                # and without a slot: a slow sender holds none while it sends.
                turn.wait("timed out waiting for a value's bytes", select.POLLIN, total)
            sizes = plan.sizes
            n = len(sizes)
            i = 0
            behind = True  # whether values queue up faster than the node reads them
            while i < n:
                size = sizes[i]
                later -= size
                if size:
                    # Reserve only once the value's bytes start to arrive: a peer that announces
                    # values and then stalls or hangs up makes the node evict nothing.
                    while True:
                        try:
                            if not sock.recv(1, socket.MSG_PEEK):
                                raise PeerClosed("peer closed the connection before the value's bytes")
                            break
                        except (BlockingIOError, InterruptedError):
                            turn.wait("timed out waiting for a value's bytes", select.POLLIN, size + later)
                turn.begin()  # the bytes are here: queue for a slot (once; a no-op while one is held)
                dst = plan.claim(i)
                i += 1
                if dst is None:
                    _discard(sock, size, later, turn, scratch)
                    continue
                # The values after this one whose bytes have all arrived too join it: reserved
                # now (their bytes are here) and read with it in one call, so a batch of small
                # values costs a few system calls, not a peek and a read each.
                views = [dst]
                refused = 0  # the size of a refused value that ends the group: drained after it
                if i < n and size < _GROUP_BYTES and behind:
                    ready = queued(sock) - size  # bytes of the values after this one, here now
                    grouped = size
                    while i < n and len(views) < _GROUP_VALUES:
                        nxt = sizes[i]
                        if nxt > ready or grouped + nxt > _GROUP_BYTES:
                            break
                        more = plan.claim_ahead(i)
                        if more is False:  # no room: claimed on its own once these landed
                            break
                        ready -= nxt
                        grouped += nxt
                        later -= nxt
                        i += 1
                        if more is None:
                            refused = nxt
                            break
                        views.append(more)
                # A read that had to wait means the node is ahead of its sender: the next values
                # will not be here whole either, so skip the look (a system call) until one is.
                behind = not _fill_views(sock, views, turn, later + refused)
                for _ in views:
                    plan.landed()
                if refused:
                    _discard(sock, refused, later, turn, scratch)
        finally:
            turn.end()
        send_views(sock, [plan.answer()], deadline)

    def get(self, plan: GetPlan, deadline: float) -> None:
        # Pinned extents stay put until the plan is released, so an overwrite cannot tear what we send.
        views = plan.views()
        if sum(v.nbytes for v in views) < _SLOT_FROM:
            send_views(self.sock, [plan.head, *views], deadline)
            return
        sock = self.sock
        sock.settimeout(0.0)
        hangup = select.poll()
        hangup.register(sock, 0)  # POLLERR and POLLHUP are always reported
        if hangup.poll(0):
            raise PeerClosed("peer closed the connection before its answer")  # do not queue for it
        turn = _Turn(sock, deadline, self.slots)
        try:
            turn.begin()
            send_views_polled(sock, [plan.head, *views], lambda: turn.wait("timed out while sending", select.POLLOUT))
        finally:
            turn.end()

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        send_views(self.sock, frames, deadline)


class _Turn:
    """One transfer's waits on a non-blocking socket, until the request's deadline, and its turn
    at the transfer slots (when it has any).

    A transfer that must wait on its peer keeps its slot only while nobody queues for one, and
    never past ``_QUANTUM`` in all; otherwise it gives the slot up at once, waits for its socket
    without one, and queues again once its peer has caught up (for input: the rest of the
    request, or 1 MiB, is queued, or the window is full). A slow or stalled peer so holds a slot
    idle only while no other transfer wants it, and a trickle earns it no new turns. Asked for
    input, a wait sleeps until that much has arrived: one wake-up, not one per segment, which on
    a loaded node is a thread hand-over each (node_scale PUT/raw at 16 clients, three
    alternating runs each: 84/84/77% -> 87/83/85%; at 1 client 121/125/122% -> 121/131/127%)."""

    def __init__(self, sock: socket.socket, deadline: float, slots: TransferSlots | None) -> None:
        self._sock = sock
        self._deadline = deadline
        self._slots = slots
        self._poll: select.poll | None = None
        self._events = 0
        self._since: float | None = None  # when the slot was taken; None while none is held

    def begin(self) -> None:
        """Take a slot (nothing to take without slots, or while one is held)."""
        if self._slots is not None and self._since is None:
            if not self._slots.acquire(self._deadline):
                raise MemKVTimeout("timed out waiting for a transfer slot")
            self._since = time.monotonic()

    def end(self) -> None:
        if self._since is not None:
            self._since = None
            assert self._slots is not None
            self._slots.release()

    def wait(self, what: str, events: int, want: int = 1) -> None:
        """Sleep until the socket is ready (for input: ``want`` bytes, at most 1 MiB, are queued,
        the window is full, or EOF); MemKVTimeout(``what``) at the deadline."""
        if self._poll is None or self._events != events:
            self._poll = select.poll()
            self._poll.register(self._sock, events)
            self._events = events
        if self._since is not None:
            assert self._slots is not None
            end = min(self._deadline, self._since + _QUANTUM)
            while not self._slots.waiting and time.monotonic() < end:
                if self._ready(want, min(end, time.monotonic() + _GLANCE)):
                    return
            self.end()  # someone queues, or the quantum is spent: they go first
            if not self._ready(want, self._deadline):
                raise MemKVTimeout(what)
            self.begin()
        elif not self._ready(want, self._deadline):
            raise MemKVTimeout(what)

    def _ready(self, want: int, until: float) -> bool:
        assert self._poll is not None
        if until <= time.monotonic():
            return False
        if self._events == select.POLLIN:
            return poll_queued(self._sock, self._poll, want, until)
        return bool(self._poll.poll(poll_ms(until)))


def _discard(sock: socket.socket, size: int, later: int, turn: _Turn, scratch: list[memoryview]) -> None:
    """Read and drop a refused value's ``size`` bytes (``later``: bytes the request sends after
    them), through ``scratch[0]`` (made on first use)."""
    if size and not scratch:
        scratch.append(memoryview(bytearray(min(_SCRATCH, size))))
    left = size
    while left:
        chunk = min(left, len(scratch[0]))
        left -= _fill(sock, scratch[0][:chunk], turn, later + left - chunk)


def _fill_views(sock: socket.socket, views: list[memoryview], turn: _Turn, later: int) -> bool:
    """Fill every view in order from a non-blocking socket, each read scattered over as many of
    them as it covers (``later``: bytes the request still sends after these); whether it waited."""
    waited = False
    pending = [v for v in views if v.nbytes]
    left = sum(v.nbytes for v in pending)
    total = left
    while pending:
        try:
            got = sock.recvmsg_into(pending[:IOV_MAX])[0]
        except (BlockingIOError, InterruptedError):
            turn.wait(f"timed out after receiving {total - left} of {total} bytes", select.POLLIN, left + later)
            waited = True
            continue
        if got == 0:
            raise PeerClosed(f"peer closed the connection after {total - left} of {total} bytes")
        left -= got
        pending = advance(pending, got)
    return waited


def _fill(sock: socket.socket, view: memoryview, turn: _Turn, later: int) -> int:
    """Read exactly ``len(view)`` bytes into ``view`` from a non-blocking socket (``later``: bytes
    the request still sends after these); the byte count."""
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:], total - got)
        except (BlockingIOError, InterruptedError):
            # One wake-up for the rest of the request (up to 1 MiB), not one per segment that lands.
            turn.wait(f"timed out after receiving {got} of {total} bytes", select.POLLIN, total - got + later)
            continue
        if n == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {total} bytes")
        got += n
    return total


class RdmaMovers(Protocol):
    def mover(self, msg: RdmaPutRequest | RdmaGetRequest, client_id: bytes, tcp: Mover) -> Mover:
        """The mover for one RDMA request: its session checked (it belongs to ``client_id``) and
        every remote range inside the session's registered region; ``tcp`` carries the answer."""
        ...


class RdmaMover:
    """Moves one request's values with one-sided verbs; the answer rides the TCP connection."""

    def __init__(
        self,
        qp: QueuePair,
        arena: Region,
        addrs: Sequence[int],
        rkeys: Sequence[int],
        tcp: Mover,
        on_fence: Callable[[], None] | None = None,
    ) -> None:
        self.qp = qp
        self.arena = arena
        self.addrs = addrs
        self.rkeys = rkeys
        self.tcp = tcp
        self._on_fence = on_fence
        self.unsafe = False  # a fence could not confirm the device is done with our extents

    def _local(self, view: memoryview) -> int:
        from lmcache_memkv.transport.rdma import buffer_address

        addr, length = buffer_address(view)
        if not self.arena.contains(addr, length):  # pragma: no cover - views come from the arena
            raise ProtocolError("internal: a view outside the registered arena", ErrorCode.INTERNAL)
        return addr

    def _run(self, ops: list[tuple[str, int, int, int, int, int]], deadline: float) -> None:
        try:
            if _FAULTS.delay_s:
                time.sleep(_FAULTS.delay_s)  # test hook only: a transfer that starts late
            self.qp.post_and_wait(ops, deadline)
        except BaseException:
            # Before any extent goes back: a late READ must not land in a reused extent, nor a
            # late WRITE read one that an overwrite is filling.
            if not self.qp.fence():
                self.unsafe = True
            if self._on_fence is not None:
                self._on_fence()
            raise

    def put(self, plan: PutPlan, deadline: float) -> None:
        from lmcache_memkv.transport.rdma import READ

        for i, size in enumerate(plan.sizes):
            dst = plan.claim(i)
            if dst is None:
                continue  # refused: nothing to read, nothing to drain
            if size:
                try:
                    self._run([(READ, self._local(dst), self.arena.lkey, size, self.addrs[i], self.rkeys[i])], deadline)
                except BaseException:
                    if self.unsafe:
                        plan.quarantine()  # a late READ may still land: the extent is never reused
                    raise
            plan.landed()
        self.tcp.reply([plan.answer()], deadline)

    def get(self, plan: GetPlan, deadline: float) -> None:
        from lmcache_memkv.transport.rdma import WRITE

        ops = [
            (WRITE, self._local(view), self.arena.lkey, view.nbytes, self.addrs[i], self.rkeys[i])
            for i, view in zip(plan.found, plan.views(), strict=True)
            if view.nbytes
        ]
        if ops:
            try:
                self._run(ops, deadline)  # every WRITE completed before the answer says OK
            except BaseException:
                if self.unsafe:
                    plan.quarantine()  # a late WRITE may still read them: keep them pinned for good
                raise
        self.tcp.reply([plan.head], deadline)

    def reply(self, frames: Sequence[Buffer], deadline: float) -> None:
        self.tcp.reply(frames, deadline)


class _Faults:
    """Test hook: ``MEMKV_FAULT_RDMA_DELAY_S`` in a node's environment delays every RDMA transfer
    by that long before it is posted (the fencing test's late WRITE). Unset in production."""

    def __init__(self) -> None:
        try:
            self.delay_s = max(0.0, float(os.environ.get("MEMKV_FAULT_RDMA_DELAY_S", "0") or 0))
        except ValueError:
            self.delay_s = 0.0


_FAULTS = _Faults()
