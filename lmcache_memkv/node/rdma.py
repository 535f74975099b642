"""The node's RDMA sessions: one RC queue pair per client, set up over ``Session.Hello``.

The node opens its verbs device once, registers the whole arena once (local access only: no
client can ever address node memory) and runs the one completion poller. A client's Hello brings
its queue pair's address and its registered L1 region; the node makes a queue pair, connects it,
and answers with its own address and a random session id. Every RPUT/RGET names that session;
the session must belong to the connection's authenticated client id, and every remote range the
request names must lie inside the region the client registered, with its rkey, before anything
is posted. A fenced session (a transfer failed or timed out) is dropped: the client's next call
gets NO_SESSION and sets up a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.node.arena import Arena
from lmcache_memkv.node.metrics import NodeMetrics
from lmcache_memkv.node.movers import Mover, RdmaMover
from lmcache_memkv.transport.rdma import QpInfo, QueuePair, RdmaError, Region, SessionsExhausted, VerbsDevice
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, ErrorCode
from lmcache_memkv.wire.messages import RdmaGetRequest, RdmaPutRequest

__all__ = ["DEFAULT_IDLE_EVICT_S", "DEFAULT_MAX_SESSIONS", "RdmaSessions", "SessionsExhausted", "open_rdma"]
log = logging.getLogger("memkv.node.rdma")
DEFAULT_MAX_SESSIONS = 1024
# A session idle this long may be evicted to make room for a new one. Far above one transfer
# (bounded by the request deadline, the frame timeout, 10 s by default) and above the client's
# lookup-then-load gap, so an evicted session is one whose client went quiet or away; a busy
# client's session is never taken from it (a new Hello is refused instead: RESOURCE_EXHAUSTED).
DEFAULT_IDLE_EVICT_S = 60.0


@dataclass
class _Session:
    token: int
    client_id: bytes
    qp: QueuePair
    region: Region  # the client's L1 pool (lkey unused)
    last_used: float


class RdmaSessions:
    def __init__(
        self,
        device: str,
        port: int,
        gid_index: int,
        arena: Arena,
        metrics: NodeMetrics,
        node_id: str,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_evict_s: float = DEFAULT_IDLE_EVICT_S,
    ) -> None:
        self.device = VerbsDevice(device, port, gid_index)
        try:
            self.arena = self.device.register(arena.address, arena.capacity, remote=False)
        except BaseException:
            self.device.close()
            raise
        self.device.start_poller()
        self._metrics = metrics
        self._node = node_id
        self._max = max_sessions
        self._idle_evict_s = idle_evict_s
        self._sessions: OrderedDict[int, _Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        # Held across a whole open() (create_qp .. insert) and by close() to set ``closed``: no
        # queue pair is ever created on a protection domain and CQ that close() is destroying.
        self._open_lock = threading.Lock()
        self.closed = False  # no new sessions (set by quiesce or close)
        self._device_closed = False
        self._quiesced: list[_Session] = []  # fenced at shutdown, destroyed by close()
        self._closers: list[threading.Thread] = []  # threads closing replaced/evicted sessions

    def describe(self) -> str:
        d = self.device
        return f"{d.name} port {d.port} GID index {d.gid_index}"

    def open(self, client_id: bytes, peer: QpInfo, region: Region) -> tuple[int, QpInfo]:
        """A new session for ``client_id``; the client's older sessions are closed (it re-Hellos
        only after a fence or a restart). At the cap, the least recently used session goes if it has
        been idle longer than the eviction bound; otherwise ``SessionsExhausted``."""
        if len(client_id) != CLIENT_ID_LEN:
            raise ValueError(f"client id must be {CLIENT_ID_LEN} bytes")
        peer.check()
        if region.length <= 0 or region.addr < 0 or region.addr + region.length > 1 << 64 or region.rkey >> 32:
            raise ValueError("memory region out of range")
        with self._open_lock:
            if self.closed:
                raise RdmaError("the node is shutting down: no new RDMA sessions")
            if self.device.failed is not None:
                # Refused with UNAVAILABLE: the client (transport auto) goes TCP for a while.
                raise RdmaError(f"the node's RDMA device is unusable: {self.device.failed}")
            if not self._room_for(client_id):
                # Checked before any verbs work: a refused Hello costs no QP. Rechecked below.
                raise SessionsExhausted(self._full_message())
            qp = self.device.create_qp()
            try:
                qp.connect(peer)
            except BaseException:
                qp.close()
                raise
            token = int.from_bytes(os.urandom(8), "big") or 1
            old: list[_Session] = []
            with self._lock:
                for t, s in list(self._sessions.items()):
                    if s.client_id == client_id:
                        old.append(self._sessions.pop(t))
                # The client's own older sessions went above, so it always has room; others only if
                # the table holds a session idle past the bound.
                room = self._evict_idle_locked(old)
                if room:
                    self._sessions[token] = _Session(token, client_id, qp, region, time.monotonic())
            if old:
                # Closing fences and waits (bounded) for flushed completions: not on the caller's
                # thread. Tracked so close() can wait for it before the device goes.
                closer = threading.Thread(target=_close_all, args=(old,), name="memkv-rdma-close", daemon=True)
                self._closers = [t for t in self._closers if t.is_alive()] + [closer]
                closer.start()
            if not room:
                qp.close()  # never posted to: the fence is immediate
                raise SessionsExhausted(self._full_message())
            return token, qp.info

    def _room_for(self, client_id: bytes) -> bool:
        with self._lock:
            if len(self._sessions) < self._max or any(s.client_id == client_id for s in self._sessions.values()):
                return True
            oldest = next(iter(self._sessions.values()))
            return time.monotonic() - oldest.last_used > self._idle_evict_s

    def _evict_idle_locked(self, out: list[_Session]) -> bool:
        """Make room for one session (caller holds ``_lock``), evicting only sessions idle past
        the bound (least recently used first); False if the table is full of recent ones."""
        now = time.monotonic()
        while len(self._sessions) >= self._max:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_used <= self._idle_evict_s:
                return False
            out.append(self._sessions.popitem(last=False)[1])
        return True

    def _full_message(self) -> str:
        return (
            f"all {self._max} RDMA sessions are in use (none idle over {self._idle_evict_s:.0f}s; "
            "--max-rdma-sessions); retry later"
        )

    def _get(self, token: int, client_id: bytes) -> _Session:
        with self._lock:
            s = self._sessions.get(token)
            if s is None or s.client_id != client_id or s.qp.fenced:
                if s is not None and s.qp.fenced:
                    self._sessions.pop(token, None)
                raise ProtocolError(
                    "no live RDMA session of this client by that id; set up a new one", ErrorCode.NO_SESSION
                )
            s.last_used = time.monotonic()
            self._sessions.move_to_end(token)
            return s

    def mover(self, msg: RdmaPutRequest | RdmaGetRequest, client_id: bytes, tcp: Mover) -> Mover:
        s = self._get(msg.session, client_id)
        lengths: Sequence[int] = msg.sizes if isinstance(msg, RdmaPutRequest) else msg.capacities
        region = s.region
        for i, (addr, rkey, n) in enumerate(zip(msg.addrs, msg.rkeys, lengths, strict=True)):
            # The client may only name its own registered pages: a range outside them (or another
            # rkey) would have the node read or write memory the client never offered.
            if rkey != region.rkey or not region.contains(addr, n):
                raise ProtocolError(
                    f"value #{i}: remote range 0x{addr:x}+{n} (rkey {rkey}) is outside the session's registered region",
                    ErrorCode.BAD_FRAME,
                )
        fences = self._metrics.rdma_fences.labels(self._node)
        return RdmaMover(s.qp, self.arena, msg.addrs, msg.rkeys, tcp, on_fence=fences.inc)

    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def quiesce(self) -> None:
        """Shutdown, step one: refuse new sessions and fence every one (ERR flushes what is
        outstanding, so a worker inside a transfer returns at once instead of at its deadline).
        The queue pairs stay allocated until ``close``: workers may still hold them."""
        with self._open_lock:  # waits for an open() under way: its QP is then in the table
            self.closed = True
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), OrderedDict()
            self._quiesced.extend(sessions)
        for s in sessions:
            s.qp.fence()

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new sessions, close every one (fence, destroy), then the device. Idempotent."""
        with self._open_lock:
            if self._device_closed:
                return
            self._device_closed = True
            self.closed = True
            closers = list(self._closers)
        with self._lock:
            sessions, self._sessions = [*self._quiesced, *self._sessions.values()], OrderedDict()
            self._quiesced = []
        for s in sessions:
            s.qp.close()
        deadline = time.monotonic() + timeout_s
        for t in closers:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                # Its QPs are fenced (or being fenced) under their own locks; closing the context
                # under it would race a destroy, so leave the device to process exit.
                log.error("RDMA: a session close thread is stuck; not closing the device")
                return
        self.device.close()


def _close_all(sessions: list[_Session]) -> None:
    for s in sessions:
        s.qp.close()


def open_rdma(
    device: str | None,
    port: int,
    gid_index: int,
    arena: Arena,
    metrics: NodeMetrics,
    node_id: str,
    required: bool,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
) -> RdmaSessions | None:
    """The node's verbs side, or None. ``device`` None: the first of ``MEMKV_RDMA_DEVICES`` (or of
    every device) is tried, and a failure only means TCP; a named device must open or the node
    refuses to start (``required``), naming why."""
    from lmcache_memkv.transport.rdma import env_devices, rdma_devices

    names = [device] if device else rdma_devices(env_devices())
    if not names:
        if required:
            raise RdmaError("--rdma-device: no RDMA device found (ibv_devices lists none, or pyverbs is missing)")
        return None
    try:
        sessions = RdmaSessions(names[0], port, gid_index, arena, metrics, node_id, max_sessions)
    except RdmaError as exc:
        if required:
            raise
        log.warning("RDMA device %s not usable, serving TCP only: %s", names[0], exc)
        return None
    log.info("RDMA data path on %s", sessions.describe())
    return sessions
