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
from lmcache_memkv.transport.rdma import QpInfo, QueuePair, RdmaError, Region, VerbsDevice
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, ErrorCode
from lmcache_memkv.wire.messages import RdmaGetRequest, RdmaPutRequest

log = logging.getLogger("memkv.node.rdma")
DEFAULT_MAX_SESSIONS = 1024


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
        only after a fence or a restart). At the cap, the least recently used session goes."""
        if len(client_id) != CLIENT_ID_LEN:
            raise ValueError(f"client id must be {CLIENT_ID_LEN} bytes")
        peer.check()
        if region.length <= 0 or region.addr < 0 or region.addr + region.length > 1 << 64 or region.rkey >> 32:
            raise ValueError("memory region out of range")
        with self._open_lock:
            if self.closed:
                raise RdmaError("the node is shutting down: no new RDMA sessions")
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
                while len(self._sessions) >= self._max:
                    old.append(self._sessions.popitem(last=False)[1])
                self._sessions[token] = _Session(token, client_id, qp, region, time.monotonic())
            if old:
                # Closing fences and waits (bounded) for flushed completions: not on the caller's
                # thread. Tracked so close() can wait for it before the device goes.
                closer = threading.Thread(target=_close_all, args=(old,), name="memkv-rdma-close", daemon=True)
                self._closers = [t for t in self._closers if t.is_alive()] + [closer]
                closer.start()
            return token, qp.info

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
    device: str | None, port: int, gid_index: int, arena: Arena, metrics: NodeMetrics, node_id: str, required: bool
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
        sessions = RdmaSessions(names[0], port, gid_index, arena, metrics, node_id)
    except RdmaError as exc:
        if required:
            raise
        log.warning("RDMA device %s not usable, serving TCP only: %s", names[0], exc)
        return None
    log.info("RDMA data path on %s", sessions.describe())
    return sessions
