"""The node's TCP data plane: one event loop owns every socket, a bounded pool of workers serves requests.

The loop (epoll) accepts, runs each handshake (HELLO, AUTH, AUTH_OK) and reads each request's
header and meta without blocking, through the sans-IO frame reader; a peer that trickles its
headers so holds no thread. Small requests that move no value bytes (lookups, releases,
deletes, pings) the loop answers itself. Any other complete request goes, with its connection,
to a worker, which runs it through the node core and the connection's mover (value bytes
straight to and from the arena, blocking I/O bounded by the frame deadline), serves any further
requests already buffered (a few, for pipelining clients), then parks the connection with the
loop again. A connection belongs to the loop or to one worker at a time, so its requests are
served in order. Deadlines (authentication, a frame's completion, idleness, the lingering close
after an error) are timers of the loop: an idle node with idle connections makes no wake-ups
at all, and shutdown wakes the loop through an eventfd.

Connections have two budgets: unauthenticated ones (all peers together, and per peer address)
must authenticate within ``auth_timeout_s``; when a new one needs a slot, the oldest of the
busiest address gives way (the oldest overall when no address holds more than a client does);
authenticated ones are capped by ``max_connections``. A keyless flood so fills only its own
budget and keyed clients are still served.
"""

from __future__ import annotations

import enum
import errno
import heapq
import itertools
import logging
import math
import os
import queue
import resource
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.errors import MemKVTimeout, ProtocolError
from lmcache_memkv.node.arena import Arena, StopFlag
from lmcache_memkv.node.config import NodeConfig, default_node_id
from lmcache_memkv.node.core import NodeCore
from lmcache_memkv.node.fence import Fence
from lmcache_memkv.node.metrics import NodeMetrics
from lmcache_memkv.node.movers import TcpMover
from lmcache_memkv.node.slots import TransferSlots, default_transfers
from lmcache_memkv.node.store import Fenced, Store
from lmcache_memkv.transport.rdma import RdmaError
from lmcache_memkv.transport.tcp import PeerClosed, send_views, tune
from lmcache_memkv.wire.constants import ErrorCode
from lmcache_memkv.wire.frames import Header
from lmcache_memkv.wire.messages import ErrorFrame, Message, encode
from lmcache_memkv.wire.reader import FrameReader
from lmcache_memkv.wire.state import MAX_AUTH_META, ServerProtocol

if TYPE_CHECKING:
    from lmcache_memkv.node.rdma import RdmaSessions

log = logging.getLogger("memkv.node")
_LINGER_S = 1.0  # after an error frame: how long we keep reading so the peer gets to see it
_LINGER_BYTES = 16 << 20
_IN_A_ROW = 8  # requests a worker serves back to back on one connection before it parks it again
_ACCEPT_BURST = 64  # connections accepted per loop turn, so a connect storm cannot starve the rest
_READ_CHUNK = 256 << 10  # meta is read in pieces, so memory follows what a peer really sent
_ACCEPT_PAUSE_S = 0.05  # out of descriptors (EMFILE): stop accepting this long rather than spin
_ERROR_SEND_S = 1.0  # how long a worker tries to deliver an error frame
_NEXT_WAIT_MS = 2  # after an answer, how long a worker waits for the connection's next request
_CLIENT_PENDING = 2  # handshakes a real client may have pending at once (see _unauth_victim)
_ARMED = select.EPOLLIN | select.EPOLLONESHOT  # one event, then the connection is off until parked again


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    LINGER = "linger"  # an error went out; reading what the peer still sends, then close


class _Conn:
    """One connection. Owned by the loop while ``busy`` is False, else by exactly one worker."""

    __slots__ = (
        "auth_deadline", "authed", "buf", "busy", "closed", "fd", "frame_deadline", "generation", "host",
        "linger_deadline", "linger_left", "mover", "pending", "phase", "proto", "reader", "request_id", "sock",
        "timer", "timer_at",
    )  # fmt: skip

    def __init__(
        self, sock: socket.socket, host: str, proto: ServerProtocol, reader: FrameReader, auth_deadline: float, slots: TransferSlots
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.host = host
        self.proto = proto
        self.reader = reader
        self.mover = TcpMover(sock, slots)
        self.phase = _Phase.HANDSHAKE
        self.buf = bytearray()  # the part of the next header or meta read so far
        self.busy = False
        self.closed = False
        self.authed = False
        self.generation = 0
        self.request_id = 0
        self.auth_deadline = auth_deadline
        self.frame_deadline = 0.0  # set when a request's first byte arrives
        self.linger_deadline = 0.0
        self.linger_left = 0
        self.timer = 0  # the live timer's sequence number (older heap entries are stale)
        self.timer_at: float | None = None
        self.pending: memoryview | None = None  # the part of an answer the loop could not send at once

    @property
    def partial(self) -> bool:
        """Part of a request's header or meta is in."""
        return bool(self.buf) or self.reader.mid_frame


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's open-file soft limit to the hard limit (a node holds one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


class NodeServer:
    def __init__(self, config: NodeConfig, stop: StopFlag | threading.Event | None = None) -> None:
        """``stop`` set during start-up interrupts the arena's pre-fault (``PrefaultInterrupted``)."""
        self.config = config
        self.arena = Arena(config.capacity, stop)
        self.store = Store(
            self.arena,
            max_lease_ttl_s=config.max_lease_ttl_s,
            lease_budget_bytes=config.lease_budget,
            max_tombstones=config.max_tombstones,
        )
        # Peers declare a member DEAD no earlier than dead_after_s after the start of a probe it
        # did not ack (control.swim). A stall longer than suspect_after_s leaves a margin of
        # (dead_after - suspect_after) for a probe that was in flight when the stall began: past
        # it we may have been declared DEAD.
        self.fence = Fence(self.store, stall_after_s=config.suspect_after_s)
        # Whether writes may be taken now (the control plane: every peer knows our data life).
        self.write_gate: Callable[[], bool] = lambda: True
        self.metrics = NodeMetrics(config.node_id, self.stats)
        self.core: NodeCore | None = None
        self.rdma: RdmaSessions | None = None  # set by start() when a verbs device opens
        self._listener: socket.socket | None = None
        self._listener_lock = threading.Lock()
        self._ep: select.epoll | None = None
        self._wake_fd = -1
        self._loop_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[_Conn, Header | None, Message | None] | None] = queue.SimpleQueue()
        self.slots = TransferSlots(config.transfers or default_transfers())  # large TCP transfers at once
        # Guards the connection table, the budgets, ownership hand-overs and the timer heap.
        self._lock = threading.Lock()
        self._empty = threading.Condition(self._lock)  # notified when the last connection closes
        self._conns: dict[int, _Conn] = {}  # by descriptor
        self._unauth: OrderedDict[_Conn, str] = OrderedDict()  # oldest first
        self._unauth_by_host: Counter[str] = Counter()
        self._authed = 0
        self._timers: list[tuple[float, int, _Conn]] = []
        self._timer_seq = itertools.count(1)
        self._sleep_until = math.inf  # when the loop wakes by itself next (read under the lock)
        self._accept_resume: float | None = None
        self._stopping = threading.Event()  # draining: connections finish what has arrived, then close
        self._drain_scanned = False
        self._exit = False
        # Set by the launcher once both planes serve, cleared on SIGTERM: what /readyz reports.
        self.serving = threading.Event()
        self._accept_closed = threading.Event()
        self.started_at = time.time()
        self.address: tuple[str, int] = ("", 0)
        self.metrics_address: tuple[str, int] | None = None
        self._m_node = config.node_id
        self._discard = bytearray(64 << 10)  # the loop's sink for lingering input

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        host, port = parse_endpoint(self.config.listen, field="--listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"--listen {self.config.listen}: cannot bind: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self.address = sock.getsockname()[:2]
        if self.config.node_id_auto and port == 0:
            # The id names the port; with an ephemeral port only now do we know it.
            self.config.node_id = default_node_id(self.address[1])
            self._m_node = self.config.node_id
            self.metrics = NodeMetrics(self.config.node_id, self.stats)
        self.metrics.transfers_waiting.labels(self._m_node).set_function(lambda: self.slots.waiting)
        if self.config.metrics_listen:
            self.metrics_address = self.metrics.serve(
                self.config.metrics_listen, lambda: self.serving.is_set() and not self._stopping.is_set()
            )
        if self.config.rdma_device != "none":
            from lmcache_memkv.node.rdma import open_rdma

            try:
                self.rdma = open_rdma(
                    self.config.rdma_device, self.config.rdma_port, self.config.rdma_gid_index, self.arena,
                    self.metrics, self.config.node_id, required=self.config.rdma_device is not None,
                    max_sessions=self.config.max_rdma_sessions,
                )  # fmt: skip
            except RdmaError as exc:
                sock.close()
                self._listener = None
                raise OSError(f"--rdma-device {self.config.rdma_device}: {exc}") from None
        self.core = NodeCore(
            self.config, self.arena, self.store, self.fence, self.metrics, lambda: self.write_gate(), self.stats,
            self.started_at, self.rdma,
        )  # fmt: skip
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._ep.register(sock.fileno(), select.EPOLLIN)
        for i in range(self.config.workers):
            t = threading.Thread(target=self._worker, name=f"memkv-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self._loop_thread = threading.Thread(target=self._loop, name="memkv-loop", daemon=True)
        self._loop_thread.start()
        log.info(
            "node %s serving data on %s (%d workers, %d transfers at once)",
            self.config.node_id, self.endpoint, self.config.workers, self.slots.count,
        )

    @property
    def endpoint(self) -> str:
        return format_endpoint(*self.address)

    def thread_ids(self) -> list[int]:
        """Kernel ids of the data plane's threads, the loop first (tests read /proc/self/task/ID)."""
        threads = [self._loop_thread, *self._workers] if self._loop_thread is not None else []
        return [t.native_id for t in threads if t is not None and t.native_id is not None]

    def stop_accepting(self) -> None:
        """Refuse new connections at once; open ones are served as usual. Idempotent.

        Call this first on SIGTERM, before slower shutdown work (leaving the cluster), so
        clients are not accepted by a node that is going away.
        """
        self._accept_closed.set()
        with self._listener_lock:  # the loop accepts under it: never from a closed descriptor
            listener, self._listener = self._listener, None
            if listener is None:
                return
            if self._ep is not None:
                try:
                    self._ep.unregister(listener.fileno())
                except (OSError, ValueError):
                    pass
            listener.close()

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish; True if every connection drained in time."""
        with self._lock:
            self._stopping.set()
        self._wake()
        self.stop_accepting()
        deadline = time.monotonic() + (self.config.drain_timeout_s if grace_s is None else grace_s)
        with self._lock:
            while self._conns and (left := deadline - time.monotonic()) > 0:
                self._empty.wait(left)
            leftover = list(self._conns.values())
            for conn in leftover:  # stragglers past the grace period: their owner sees the error and closes
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._exit = True
        self._wake()
        loop = self._loop_thread
        if loop is not None and loop is not threading.current_thread():
            loop.join(5)
            if not loop.is_alive():
                with self._lock:  # nothing writes to it once the loop is gone
                    wake_fd, self._wake_fd = self._wake_fd, -1
                if wake_fd >= 0:
                    os.close(wake_fd)
        for _ in self._workers:
            self._jobs.put(None)
        if self.rdma is not None:
            # Workers may still be inside an RDMA transfer. Fence every session first (their
            # transfers fail at once, not at their deadlines), join the workers (bounded), and
            # only then destroy the queue pairs and the device they might still touch.
            self.rdma.quiesce()
            join_by = time.monotonic() + self.config.frame_timeout_s + 1.0
            for w in self._workers:
                if w is not threading.current_thread():
                    w.join(max(0.0, join_by - time.monotonic()))
            stuck = sum(w.is_alive() for w in self._workers)
            if stuck:
                log.warning("%d workers still busy at shutdown; closing RDMA sessions under them", stuck)
            self.rdma.close()  # Session.Hello is refused since quiesce (the control plane still runs)
        return not leftover

    def stats(self) -> dict[str, int]:
        return self.store.snapshot()

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        ep = self._ep
        assert ep is not None
        try:
            while not self._exit:
                with self._lock:
                    timers = self._timers
                    while timers and (timers[0][2].timer != timers[0][1] or timers[0][2].closed):
                        heapq.heappop(timers)  # replaced or closed: no reason to wake up for it
                    wake_at = min(timers[0][0] if timers else math.inf, self._accept_resume or math.inf)
                    self._sleep_until = wake_at
                timeout = -1.0 if wake_at == math.inf else max(0.0, wake_at - time.monotonic())
                try:
                    events = ep.poll(timeout)
                except InterruptedError:
                    continue
                with self._lock:
                    self._sleep_until = -math.inf  # awake: workers need not wake us for new timers
                for fd, _ in events:
                    if fd == self._wake_fd:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except OSError:
                            pass
                        continue
                    listener = self._listener
                    if listener is not None and fd == listener.fileno():
                        self._accept()
                        continue
                    conn = self._conns.get(fd)
                    if conn is not None and not conn.busy and not conn.closed:
                        self._on_readable(conn)
                self._run_timers()
                if self._stopping.is_set() and not self._drain_scanned:
                    self._drain_scanned = True
                    self._drain_idle()
        except Exception:
            log.exception("data-plane event loop failed")
        finally:
            self._shut_loop()

    def _shut_loop(self) -> None:
        with self._lock:
            self._exit = True
            mine = [c for c in self._conns.values() if not c.busy]
        for conn in mine:
            self._close(conn)
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        with self._lock:  # a worker parking a straggler now finds no loop and closes it
            ep, self._ep = self._ep, None
        if ep is not None:
            ep.close()

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            with self._listener_lock:
                listener = self._listener
                if listener is None:
                    return
                try:
                    sock, addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("cannot accept a connection: %s; pausing accepts", exc)
                        assert self._ep is not None
                        self._ep.modify(listener.fileno(), 0)
                        self._accept_resume = time.monotonic() + _ACCEPT_PAUSE_S
                    return  # ECONNABORTED and the like: the peer is gone already
            self._open(sock, str(addr[0]))

    def _open(self, sock: socket.socket, host: str) -> None:
        cfg = self.config
        sock.setblocking(False)
        proto = ServerProtocol(cfg.node_id, cfg.auth_key, cfg.limits)
        reader = FrameReader(cfg.limits, max_meta_len=MAX_AUTH_META)  # an AUTH frame is tiny: read no more before it
        conn = _Conn(sock, host, proto, reader, time.monotonic() + cfg.auth_timeout_s, self.slots)
        if not self._admit(conn):
            return
        tune(sock)
        self.metrics.accepted.labels(self._m_node).inc()
        self.metrics.connections.labels(self._m_node).inc()
        try:
            self._send_now(conn, proto.hello())
            assert self._ep is not None
            self._ep.register(conn.fd, _ARMED)
        except OSError:
            self._close(conn)
            return
        with self._lock:
            self._set_timer(conn, conn.auth_deadline)

    def _admit(self, conn: _Conn) -> bool:
        """Count a new connection against the unauthenticated budgets; False if refused."""
        cfg = self.config
        host = conn.host
        victim: _Conn | None = None
        with self._lock:
            if self._unauth_by_host[host] >= cfg.max_unauth_per_host:
                refused = f"{cfg.max_unauth_per_host} unauthenticated connections from {host} already (--max-unauth-per-host)"
            else:
                refused = ""
                if len(self._unauth) >= cfg.max_unauth_connections:
                    # Full: a pending handshake gives way: the oldest of the address holding
                    # the most, once that is more than a real client holds (it authenticates
                    # within a round trip, with one or two connections opening at once), so a
                    # flood pushes out its own connections, not a real client that a busy host
                    # made slow to answer HELLO; else the oldest overall.
                    victim, old_host = self._unauth_victim()
                    del self._unauth[victim]
                    self._forget_unauth_host(old_host)
                self._unauth[conn] = host
                self._unauth_by_host[host] += 1
                self._conns[conn.fd] = conn
        if victim is not None:
            self.metrics.protocol_errors.labels(self._m_node, "unauth_evicted").inc()
            self._close(victim)  # handshakes run on the loop: it is ours to close
        if refused:
            self.metrics.protocol_errors.labels(self._m_node, "too_many_connections").inc()
            log.warning("refusing a connection: %s", refused)
            try:
                conn.sock.send(encode(ErrorFrame(code=ErrorCode.BUSY, message=f"node has {refused}; try later"), 0))
            except OSError:
                pass
            conn.sock.close()
            return False
        return True

    def _unauth_victim(self) -> tuple[_Conn, str]:
        """The pending handshake that gives way (see ``_admit``); call with the lock held."""
        busiest = max(self._unauth_by_host.values())
        if busiest <= _CLIENT_PENDING:
            return next(iter(self._unauth.items()))  # no address stands out: the oldest
        for conn, host in self._unauth.items():  # oldest first
            if self._unauth_by_host[host] == busiest:
                return conn, host
        raise AssertionError("unauthenticated budget out of step with its per-address counts")

    def _forget_unauth_host(self, host: str) -> None:
        self._unauth_by_host[host] -= 1
        if self._unauth_by_host[host] <= 0:
            del self._unauth_by_host[host]

    def _authenticated(self, conn: _Conn) -> None:
        """Move a connection from the unauthenticated budget to the authenticated one."""
        with self._lock:
            host = self._unauth.pop(conn, None)
            if host is not None:
                self._forget_unauth_host(host)
            if self._authed >= self.config.max_connections:
                raise ProtocolError(
                    f"node has {self.config.max_connections} connections open (--max-connections); try later",
                    ErrorCode.BUSY,
                )
            conn.authed = True
            self._authed += 1

    def _on_readable(self, conn: _Conn) -> None:
        if conn.phase is _Phase.LINGER:
            self._linger_read(conn)
            return
        try:
            frame = self._pump(conn)
            if frame is None:
                if self._stopping.is_set() and conn.phase is _Phase.READY and not conn.partial:
                    self._bye(conn, blocking=False)
                else:
                    self._park(conn)
                return
            header, msg = frame
            conn.request_id = header.request_id
            if conn.phase is _Phase.HANDSHAKE:
                self._handshake(conn, header, msg)
                if self._stopping.is_set() and not _readable(conn.sock):
                    self._bye(conn, blocking=False)
                else:
                    self._park(conn)
                return
            core = self.core
            assert core is not None
            if core.answers_at_once(msg):
                self._answer_here(conn, core, header, msg)
                return
        except Exception as exc:
            self._on_error(conn, exc, blocking=False)
            return
        self._to_worker(conn, header, msg)

    def _to_worker(self, conn: _Conn, header: Header | None, msg: Message | None) -> None:
        """Hand the connection to a worker; a None request: it finishes sending ``conn.pending``."""
        conn.busy = True  # a worker's now, until it parks the connection again
        self._jobs.put((conn, header, msg))

    def _answer_here(self, conn: _Conn, core: NodeCore, header: Header, msg: Message) -> None:
        """Answer a lookup, release, delete or ping on the loop: it so costs no thread hand-over.
        One request per connection per turn: a peer pipelining many cannot hold up accepts,
        handshakes and everyone else's requests (what it has buffered wakes the loop again). An
        answer the socket will not take whole goes on to a worker, which sends the rest."""
        conn.proto.check_request(header)
        frame = core.answer(header, msg, conn.generation, conn.proto.client_id)
        try:
            sent = conn.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(frame):
            conn.pending = memoryview(frame)[sent:]
            self._to_worker(conn, None, None)
        elif self._stopping.is_set() and not conn.partial and not _readable(conn.sock):
            self._bye(conn, blocking=False)
        else:
            self._park(conn)

    def _handshake(self, conn: _Conn, header: Header, msg: Message) -> None:
        try:
            reply = conn.proto.on_auth(header, msg)
        except ProtocolError as exc:
            self.metrics.auth_failures.labels(self._m_node).inc()
            log.warning("auth failure from %s: %s", _peer(conn.sock), exc)
            raise
        self._authenticated(conn)
        conn.reader.max_meta_len = None
        conn.generation = self.store.generation
        self._send_now(conn, reply)
        conn.phase = _Phase.READY

    def _pump(self, conn: _Conn) -> tuple[Header, Message] | None:
        """Read what has arrived of the next request's header and meta, without blocking.

        The request once complete (its value bytes, if any, are left in the socket for the
        mover), or None with the part read so far kept on the connection.
        """
        sock, reader = conn.sock, conn.reader
        while True:
            need = reader.next_size() - len(conn.buf)
            try:
                chunk = sock.recv(min(need, _READ_CHUNK))
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise PeerClosed("peer closed the connection")
            if conn.phase is _Phase.READY and not conn.partial:
                # From a request's first byte, the whole frame must arrive within the frame timeout.
                conn.frame_deadline = time.monotonic() + self.config.frame_timeout_s
            if len(chunk) < need:
                conn.buf += chunk
                continue
            data: bytes | bytearray = chunk
            if conn.buf:
                conn.buf += chunk
                data, conn.buf = conn.buf, bytearray()
            frame = reader.feed(data)
            if frame is not None:
                return frame

    # ------------------------------------------------------------------ timers and parking

    def _set_timer(self, conn: _Conn, when: float | None) -> None:
        """Make ``when`` the connection's one live deadline (None: none). Call with the lock held."""
        if when == conn.timer_at:
            return
        conn.timer_at = when
        if when is None:
            conn.timer = 0
            return
        seq = next(self._timer_seq)
        conn.timer = seq
        heapq.heappush(self._timers, (when, seq, conn))
        if len(self._timers) > 2 * len(self._conns) + 1024:  # stale entries of busy connections: compact
            self._timers = [t for t in self._timers if t[2].timer == t[1] and not t[2].closed]
            heapq.heapify(self._timers)
        if when < self._sleep_until:
            self._wake()

    def _deadline(self, conn: _Conn) -> float | None:
        if conn.phase is _Phase.HANDSHAKE:
            return conn.auth_deadline
        if conn.phase is _Phase.LINGER:
            return conn.linger_deadline
        if conn.partial:
            return conn.frame_deadline
        idle = self.config.idle_timeout_s
        return time.monotonic() + idle if idle else None

    def _park(self, conn: _Conn) -> None:
        """Hand the connection (back) to the loop: its deadline set, its next readable event armed."""
        conn.sock.setblocking(False)
        with self._lock:
            if conn.closed:
                return
            if self._exit or self._ep is None:
                conn.busy = True  # nobody will watch it: close below
            else:
                self._set_timer(conn, self._deadline(conn))
                conn.busy = False
                try:
                    self._ep.modify(conn.fd, _ARMED)
                except (OSError, ValueError):
                    conn.busy = True
                else:
                    if self._stopping.is_set() and conn.phase is _Phase.READY and not conn.partial:
                        # Draining began while a worker had it: the loop looks again (a check and
                        # the flag both under the lock, so no connection slips between them).
                        self._drain_scanned = False
                        self._wake()
                    return
        self._close(conn)

    def _run_timers(self) -> None:
        now = time.monotonic()
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            with self._listener_lock:
                if self._listener is not None and self._ep is not None:
                    self._ep.modify(self._listener.fileno(), select.EPOLLIN)
        due: list[tuple[int, _Conn]] = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                _, seq, conn = heapq.heappop(self._timers)
                if conn.timer != seq or conn.closed:
                    continue  # a later deadline replaced it
                if conn.busy:  # a worker has it and enforces its own deadlines; parking sets a new one
                    conn.timer_at = None
                    continue
                due.append((seq, conn))
        for seq, conn in due:
            if conn.timer != seq or conn.busy or conn.closed:
                continue  # a later deadline replaced it, or a worker has the connection
            conn.timer_at = None
            if conn.phase is _Phase.LINGER:
                self._close(conn)
            elif conn.phase is _Phase.HANDSHAKE or conn.partial:
                got = len(conn.buf)
                self._on_error(conn, MemKVTimeout(f"timed out with {got} bytes of a frame's header or meta read"), blocking=False)
            else:
                self._close(conn)  # idle past --idle-timeout

    def _drain_idle(self) -> None:
        """Stopping: connections with nothing pending are told why we hang up; the rest finish first."""
        with self._lock:
            mine = [c for c in self._conns.values() if not c.busy and not c.closed and c.phase is _Phase.READY]
        for conn in mine:
            if not conn.partial:
                self._on_readable(conn)  # serves what has arrived, else says goodbye

    # ------------------------------------------------------------------ workers

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, header, msg = job
            try:
                self._serve(conn, header, msg)
            except Exception as exc:
                self._on_error(conn, exc, blocking=True)

    def _serve(self, conn: _Conn, header: Header | None, msg: Message | None) -> None:
        core = self.core
        assert core is not None
        served = 0
        if header is None and conn.pending is not None:  # the rest of an answer the loop began
            pending, conn.pending = conn.pending, None
            send_views(conn.sock, [pending], conn.frame_deadline)
        while True:
            if header is not None and msg is not None:
                conn.proto.check_request(header)
                core.serve(header, msg, conn.generation, conn.proto.client_id, conn.mover, conn.frame_deadline)
                served += 1
                if served >= _IN_A_ROW:
                    break  # fair to other connections: what is buffered wakes the loop again
            conn.sock.setblocking(False)
            frame = self._pump(conn)  # pipelined requests already here are served at once
            if frame is None and not conn.partial and self._jobs.empty() and _readable(conn.sock, _NEXT_WAIT_MS):
                # A client moving a stream of batches sends its next request as soon as it has
                # the answer: waiting a moment for it (when no other request waits for a worker)
                # saves two thread hand-overs, to the loop and back, each a scheduling delay on a
                # busy host.
                frame = self._pump(conn)
            if frame is None:
                break
            header, msg = frame
            conn.request_id = header.request_id
        if self._stopping.is_set() and not conn.partial and not _readable(conn.sock):
            self._bye(conn, blocking=True)  # draining, and nothing more has arrived
            return
        self._park(conn)

    # ------------------------------------------------------------------ errors and closing

    def _on_error(self, conn: _Conn, exc: BaseException, blocking: bool) -> None:
        node = self._m_node
        peer = _peer(conn.sock)
        code: int
        if isinstance(exc, Fenced):
            self.metrics.protocol_errors.labels(node, "fenced").inc()
            code, message = ErrorCode.FENCED, f"node dropped its data; reconnect ({exc})"
        elif isinstance(exc, ProtocolError):
            self.metrics.protocol_errors.labels(node, _reason(exc.code)).inc()
            log.info("closing connection from %s: %s", peer, exc)
            code, message = exc.code, str(exc)
        elif isinstance(exc, MemKVTimeout):
            self.metrics.protocol_errors.labels(node, "timeout").inc()
            log.info("closing connection from %s: %s", peer, exc)
            code, message = ErrorCode.TIMEOUT, f"frame not completed in time: {exc}"
        elif isinstance(exc, RdmaError):
            self.metrics.protocol_errors.labels(node, "rdma").inc()
            log.info("RDMA transfer for %s failed (queue pair fenced): %s", peer, exc)
            code, message = ErrorCode.INTERNAL, f"RDMA transfer failed: {exc}"
        elif isinstance(exc, (PeerClosed, ConnectionError)):
            self._close(conn)
            return
        elif isinstance(exc, OSError):
            log.info("connection from %s failed: %s", peer, exc)
            self._close(conn)
            return
        else:  # never let one connection take the node down
            log.error("internal error serving %s", peer, exc_info=exc)
            code, message = ErrorCode.INTERNAL, "internal error"
        self._send_error(conn, code, message, blocking)
        self._linger(conn)

    def _send_error(self, conn: _Conn, code: int, message: str, blocking: bool) -> None:
        frame = encode(ErrorFrame(code=code, message=message), conn.request_id)
        try:
            if blocking:
                send_views(conn.sock, [frame], time.monotonic() + _ERROR_SEND_S)
            else:
                conn.sock.setblocking(False)
                conn.sock.send(frame)  # the loop never blocks: a peer with a full window misses it
        except (OSError, MemKVTimeout):
            pass

    def _bye(self, conn: _Conn, blocking: bool) -> None:
        self._send_error(conn, ErrorCode.SHUTTING_DOWN, "node is shutting down", blocking)
        self._close(conn)

    def _linger(self, conn: _Conn) -> None:
        """Half-close, then let the loop read and discard what the peer still sends (bounded), then close.

        Closing a socket with unread input makes the kernel answer with RST, which can overtake
        the error frame we just sent; reading a bounded amount first lets the peer see why.
        """
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        with self._lock:
            host = self._unauth.pop(conn, None)
            if host is not None:
                self._forget_unauth_host(host)
        conn.phase = _Phase.LINGER
        conn.linger_left = _LINGER_BYTES
        conn.linger_deadline = time.monotonic() + _LINGER_S
        self._park(conn)

    def _linger_read(self, conn: _Conn) -> None:
        view = memoryview(self._discard)
        while True:
            try:
                n = conn.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                self._park(conn)
                return
            except OSError:
                break
            conn.linger_left -= n
            if n == 0 or conn.linger_left <= 0:
                break
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            if self._conns.get(conn.fd) is conn:  # first out of the table: the descriptor may be reused once closed
                del self._conns[conn.fd]
            host = self._unauth.pop(conn, None)
            if host is not None:
                self._forget_unauth_host(host)
            if conn.authed:
                self._authed -= 1
            conn.timer = 0
            if self._ep is not None:
                try:
                    self._ep.unregister(conn.fd)
                except (OSError, ValueError):
                    pass
            if not self._conns:
                self._empty.notify_all()
        conn.proto.close()
        try:
            conn.sock.close()
        except OSError:
            pass
        self.metrics.connections.labels(self._m_node).dec()

    def _send_now(self, conn: _Conn, data: bytes) -> None:
        """A handshake frame, sent without blocking: it fits any fresh socket's buffer."""
        if conn.sock.send(data) != len(data):
            raise ConnectionError("peer is not reading its handshake")


def _readable(sock: socket.socket, wait_ms: int = 0) -> bool:
    """Input (or EOF) is waiting, or arrives within ``wait_ms``, without consuming it (poll:
    descriptors past 1024 are common here)."""
    try:
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(wait_ms))
    except (OSError, ValueError):
        return True


def _reason(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "other"


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return format_endpoint(host, port)
    except OSError:
        return "?"
