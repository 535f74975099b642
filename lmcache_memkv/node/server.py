"""The node's TCP data plane: one thread per connection, value bytes straight to and from the arena.

Connections have two budgets: unauthenticated ones (all peers together, and per peer address)
must authenticate within ``auth_timeout_s``, and the oldest is dropped when a new one needs its
slot; authenticated ones are capped by ``max_connections``. A keyless flood so fills only its
own budget and keyed clients are still served.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.errors import MemKVTimeout, ProtocolError
from lmcache_memkv.node.arena import Arena, StopFlag
from lmcache_memkv.node.config import NodeConfig, default_node_id
from lmcache_memkv.node.fence import Fence
from lmcache_memkv.node.metrics import NodeMetrics
from lmcache_memkv.node.store import Extent, Fenced, Store
from lmcache_memkv.transport.tcp import (
    PeerClosed,
    drain,
    linger_close,
    read_frame,
    recv_into_exact,
    send_views,
    tune,
    wait_for_data,
)
from lmcache_memkv.wire.constants import ErrorCode, Op, Status
from lmcache_memkv.wire.frames import Header
from lmcache_memkv.wire.messages import (
    DeleteRequest,
    DeleteResponse,
    ErrorFrame,
    ExistsRequest,
    ExistsResponse,
    GetRequest,
    GetResponse,
    ListRequest,
    ListResponse,
    Message,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    ReleaseRequest,
    ReleaseResponse,
    StatsResponse,
    encode,
)
from lmcache_memkv.wire.reader import FrameReader
from lmcache_memkv.wire.state import MAX_AUTH_META, ServerProtocol

log = logging.getLogger("memkv.node")
_POLL_MS = 200  # how often an idle connection checks for shutdown
_SCRATCH = 256 << 10  # discard buffer for values a PUT could not store
_LINGER_S = 1.0  # after an error frame: how long we keep reading so the peer gets to see it
_LINGER_BYTES = 16 << 20


@dataclass
class _Conn:
    thread: threading.Thread
    host: str
    authed: bool = False


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
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[socket.socket, _Conn] = {}
        self._unauth: OrderedDict[socket.socket, str] = OrderedDict()  # oldest first
        self._unauth_by_host: Counter[str] = Counter()
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()  # draining: connections finish what has arrived, then close
        # Set by the launcher once both planes serve, cleared on SIGTERM: what /readyz reports.
        self.serving = threading.Event()
        self._accept_closed = threading.Event()
        self.started_at = time.time()
        self.address: tuple[str, int] = ("", 0)
        self.metrics_address: tuple[str, int] | None = None
        self._m_node = config.node_id

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
        sock.listen(256)
        sock.settimeout(_POLL_MS / 1000)
        self._listener = sock
        self.address = sock.getsockname()[:2]
        if self.config.node_id_auto and port == 0:
            # The id names the port; with an ephemeral port only now do we know it.
            self.config.node_id = default_node_id(self.address[1])
            self._m_node = self.config.node_id
            self.metrics = NodeMetrics(self.config.node_id, self.stats)
        if self.config.metrics_listen:
            self.metrics_address = self.metrics.serve(
                self.config.metrics_listen, lambda: self.serving.is_set() and not self._stopping.is_set()
            )
        self._accept_thread = threading.Thread(target=self._accept_loop, name="memkv-accept", daemon=True)
        self._accept_thread.start()
        log.info("node %s serving data on %s", self.config.node_id, self.endpoint)

    @property
    def endpoint(self) -> str:
        return format_endpoint(*self.address)

    def stop_accepting(self) -> None:
        """Refuse new connections at once; open ones are served as usual. Idempotent.

        Call this first on SIGTERM, before slower shutdown work (leaving the cluster), so
        clients are not accepted by a node that is going away.
        """
        self._accept_closed.set()
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            except OSError:
                pass
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join()
        if listener is not None:
            listener.close()

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish; True if every connection drained in time."""
        self._stopping.set()
        self.stop_accepting()
        deadline = time.monotonic() + (self.config.drain_timeout_s if grace_s is None else grace_s)
        with self._conns_lock:
            threads = [c.thread for c in self._conns.values()]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._conns_lock:
            leftover = list(self._conns)
        for sock in leftover:  # stragglers past the grace period
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return not leftover

    def stats(self) -> dict[str, int]:
        return self.store.snapshot()

    # ------------------------------------------------------------------ accept

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._accept_closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._accept_closed.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off rather than spin
                continue
            if self._accept_closed.is_set():  # raced with stop_accepting
                sock.close()
                return
            host = str(addr[0])
            if not self._admit(sock, host):
                continue
            tune(sock)
            t = threading.Thread(target=self._serve_conn, args=(sock,), name="memkv-conn", daemon=True)
            with self._conns_lock:
                self._conns[sock] = _Conn(thread=t, host=host)
            self.metrics.accepted.labels(self._m_node).inc()
            t.start()

    def _admit(self, sock: socket.socket, host: str) -> bool:
        """Count a new connection against the unauthenticated budgets; False if refused."""
        cfg = self.config
        victim: socket.socket | None = None
        with self._conns_lock:
            if self._unauth_by_host[host] >= cfg.max_unauth_per_host:
                refused = f"{cfg.max_unauth_per_host} unauthenticated connections from {host} already (--max-unauth-per-host)"
            else:
                refused = ""
                if len(self._unauth) >= cfg.max_unauth_connections:
                    # Full: the oldest pending handshake gives way. A real client authenticates
                    # within a round trip, so only connections that never do are pushed out.
                    victim, old_host = self._unauth.popitem(last=False)
                    self._forget_unauth_host(old_host)
                self._unauth[sock] = host
                self._unauth_by_host[host] += 1
        if victim is not None:
            self.metrics.protocol_errors.labels(self._m_node, "unauth_evicted").inc()
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its thread wakes up and closes it
            except OSError:
                pass
        if refused:
            self.metrics.protocol_errors.labels(self._m_node, "too_many_connections").inc()
            log.warning("refusing a connection: %s", refused)
            self._send_error(sock, 0, ErrorCode.BUSY, f"node has {refused}; try later")
            sock.close()
            return False
        return True

    def _forget_unauth_host(self, host: str) -> None:
        self._unauth_by_host[host] -= 1
        if self._unauth_by_host[host] <= 0:
            del self._unauth_by_host[host]

    def _authenticated(self, sock: socket.socket) -> None:
        """Move a connection from the unauthenticated budget to the authenticated one."""
        with self._conns_lock:
            host = self._unauth.pop(sock, None)
            if host is not None:
                self._forget_unauth_host(host)
            authed = sum(1 for c in self._conns.values() if c.authed)
            if authed >= self.config.max_connections:
                raise ProtocolError(
                    f"node has {self.config.max_connections} connections open (--max-connections); try later",
                    ErrorCode.BUSY,
                )
            conn = self._conns.get(sock)
            if conn is not None:
                conn.authed = True

    # ------------------------------------------------------------------ one connection

    def _serve_conn(self, sock: socket.socket) -> None:
        node = self._m_node
        cfg = self.config
        self.metrics.connections.labels(node).inc()
        proto = ServerProtocol(cfg.node_id, cfg.auth_key, cfg.limits)
        reader = FrameReader(cfg.limits, max_meta_len=MAX_AUTH_META)  # an AUTH frame is tiny: read no more before it
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        request_id = 0
        generation = self.store.generation
        failed = False  # an error frame went out: close with a bounded linger so the peer can read it
        try:
            auth_deadline = time.monotonic() + cfg.auth_timeout_s
            send_views(sock, [proto.hello()], auth_deadline)
            header, msg = read_frame(sock, reader, auth_deadline)
            request_id = header.request_id
            try:
                reply = proto.on_auth(header, msg)
            except ProtocolError as exc:
                self.metrics.auth_failures.labels(node).inc()
                log.warning("auth failure from %s: %s", _peer(sock), exc)
                raise
            self._authenticated(sock)
            reader.max_meta_len = None
            generation = self.store.generation
            send_views(sock, [reply], auth_deadline)
            idle_since = time.monotonic()
            while True:
                stopping = self._stopping.is_set()
                # Draining: serve what has already arrived (pipelined requests are in flight
                # too), then say why we hang up.
                if not poller.poll(0 if stopping else _POLL_MS):
                    if stopping:
                        self._send_error(sock, 0, ErrorCode.SHUTTING_DOWN, "node is shutting down")
                        return
                    idle = cfg.idle_timeout_s
                    if idle and time.monotonic() - idle_since > idle:
                        return
                    continue
                # From a frame's first byte, the whole frame must arrive within the frame timeout.
                deadline = time.monotonic() + cfg.frame_timeout_s
                header, msg = read_frame(sock, reader, deadline)
                request_id = header.request_id
                proto.check_request(header)
                self.fence.check()  # after a stall: drop the data before serving anything
                if generation != self.store.generation:
                    raise Fenced("the node dropped its data since this connection was opened")
                self._serve_request(sock, header, msg, deadline, generation, proto.client_id)
                idle_since = time.monotonic()
        except Fenced as exc:
            failed = True
            self.metrics.protocol_errors.labels(node, "fenced").inc()
            self._send_error(sock, request_id, ErrorCode.FENCED, f"node dropped its data; reconnect ({exc})")
        except ProtocolError as exc:
            failed = True
            self.metrics.protocol_errors.labels(node, _reason(exc.code)).inc()
            log.info("closing connection from %s: %s", _peer(sock), exc)
            self._send_error(sock, request_id, exc.code, str(exc))
        except MemKVTimeout as exc:
            failed = True
            self.metrics.protocol_errors.labels(node, "timeout").inc()
            log.info("closing connection from %s: %s", _peer(sock), exc)
            self._send_error(sock, request_id, ErrorCode.TIMEOUT, f"frame not completed in time: {exc}")
        except (PeerClosed, ConnectionError):
            pass
        except OSError as exc:
            log.info("connection from %s failed: %s", _peer(sock), exc)
        except Exception:  # never let one connection take the node down
            failed = True
            log.exception("internal error serving %s", _peer(sock))
            self._send_error(sock, request_id, ErrorCode.INTERNAL, "internal error")
        finally:
            proto.close()
            poller.unregister(sock)
            if failed:
                linger_close(sock, _LINGER_S, _LINGER_BYTES)
            else:
                sock.close()
            with self._conns_lock:
                self._conns.pop(sock, None)
                host = self._unauth.pop(sock, None)
                if host is not None:
                    self._forget_unauth_host(host)
            self.metrics.connections.labels(node).dec()

    def _send_error(self, sock: socket.socket, request_id: int, code: int, message: str) -> None:
        try:
            send_views(sock, [encode(ErrorFrame(code=code, message=message), request_id)], time.monotonic() + 1.0)
        except (OSError, MemKVTimeout):
            pass

    def _serve_request(
        self, sock: socket.socket, header: Header, msg: Message, deadline: float, generation: int, client_id: bytes
    ) -> None:
        started = time.perf_counter()
        op = header.base_op
        rid = header.request_id
        outcome = "ok"
        if isinstance(msg, PutRequest):
            outcome = self._put(sock, rid, msg, deadline, generation)
        elif isinstance(msg, GetRequest):
            outcome = self._get(sock, rid, msg, deadline)
        else:
            reply = self._inline(msg, client_id)
            send_views(sock, [encode(reply, rid)], deadline)
        labels = (self._m_node, op.name.lower())
        self.metrics.ops.labels(*labels, outcome).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    def _put(self, sock: socket.socket, rid: int, msg: PutRequest, deadline: float, generation: int) -> str:
        """Space for each value is reserved only once its bytes start to arrive, and the value is
        published as soon as it is in: a peer that stops early has made the node evict at most
        the values it began to send."""
        statuses: list[Status] = []
        view = self.arena.view
        scratch: memoryview | None = None  # only a refused value needs it; most requests never do
        ready = self.write_gate()
        for key, size, version in zip(msg.keys, msg.sizes, msg.versions, strict=True):
            if size:
                wait_for_data(sock, deadline)
            slot = self.store.reserve(key, size, version, generation) if ready else self.store.refuse(key, version, generation)
            if isinstance(slot, Extent):
                try:
                    recv_into_exact(sock, view[slot.offset : slot.offset + size], deadline)
                except BaseException:
                    self.store.abort(slot)
                    raise
                statuses.append(self.store.publish(key, slot, version, generation))
            else:
                if scratch is None:
                    scratch = memoryview(bytearray(min(_SCRATCH, max(size, 1))))
                drain(sock, size, scratch, deadline)
                statuses.append(slot)
        self.metrics.bytes_in.labels(self._m_node).inc(sum(msg.sizes))
        self.metrics.items.labels(self._m_node, "put").inc(len(msg.keys))
        send_views(sock, [encode(PutResponse(statuses=statuses), rid)], deadline)
        return "ok" if all(s == Status.OK for s in statuses) else "partial"

    def _get(self, sock: socket.socket, rid: int, msg: GetRequest, deadline: float) -> str:
        pinned: list[Extent] = []
        statuses: list[Status] = []
        lengths: list[int] = []
        versions: list[int] = []
        try:
            for key, cap in zip(msg.keys, msg.capacities, strict=True):
                status, ext, version = self.store.pin(key, cap, msg.exact)
                statuses.append(status)
                lengths.append(ext.length if ext else 0)
                versions.append(version)
                if status == Status.OK and ext is not None:
                    pinned.append(ext)
            view = self.arena.view
            head = encode(GetResponse(statuses=statuses, lengths=lengths, versions=versions), rid)
            # Pinned extents stay put until unpinned, so an overwrite cannot tear what we send.
            send_views(sock, [head, *(view[e.offset : e.offset + e.length] for e in pinned)], deadline)
        finally:
            if pinned:
                self.store.unpin(pinned)
        sent = sum(e.length for e in pinned)
        self.metrics.bytes_out.labels(self._m_node).inc(sent)
        self.metrics.items.labels(self._m_node, "get").inc(len(msg.keys))
        return "ok" if len(pinned) == len(msg.keys) else "partial"

    def _inline(self, msg: Message, client_id: bytes) -> Message:
        if isinstance(msg, ExistsRequest):
            found = self.store.exists(msg.keys, msg.lease_ttl_ms / 1000.0, client_id)
            return ExistsResponse(
                statuses=[f[0] for f in found],
                lengths=[f[1] for f in found],
                versions=[f[2] for f in found],
                lease_ids=[f[3] for f in found],
            )
        if isinstance(msg, ReleaseRequest):
            return ReleaseResponse(statuses=self.store.release(msg.lease_ids, client_id))
        if isinstance(msg, DeleteRequest):
            return DeleteResponse(statuses=self.store.delete(msg.keys, msg.versions))
        if isinstance(msg, ListRequest):
            items, cursor = self.store.list(msg.prefix, msg.cursor, msg.limit)
            return ListResponse(keys=[k for k, _ in items], sizes=[n for _, n in items], next_cursor=cursor)
        if isinstance(msg, PingRequest):
            return PingResponse(data=msg.data)
        if msg.op is Op.STATS:
            body = dict(self.stats(), node_id=self.config.node_id, uptime_s=int(time.time() - self.started_at))
            return StatsResponse(body=json.dumps(body).encode())
        raise ProtocolError(f"opcode {msg.op.name} is not a request", ErrorCode.UNKNOWN_OP)


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
