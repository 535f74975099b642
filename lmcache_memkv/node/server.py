"""The node's TCP data plane: one thread per connection, value bytes straight to and from the arena."""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time

from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.errors import MemKVTimeout, ProtocolError
from lmcache_memkv.node.arena import Arena
from lmcache_memkv.node.config import NodeConfig, default_node_id
from lmcache_memkv.node.metrics import NodeMetrics
from lmcache_memkv.node.store import Extent, Store
from lmcache_memkv.transport.tcp import (
    PeerClosed,
    drain,
    linger_close,
    recv_exact,
    recv_into_exact,
    send_views,
    tune,
)
from lmcache_memkv.wire.constants import ErrorCode, Op, Status
from lmcache_memkv.wire.frames import HEADER_LEN, Header, decode_header
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
    decode,
    encode,
)
from lmcache_memkv.wire.state import ServerProtocol

log = logging.getLogger("memkv.node")
_MAX_AUTH_META = 256  # u8 proof length + a 32-byte proof, with room to spare
_POLL_MS = 200  # how often an idle connection checks for shutdown
_SCRATCH = 256 << 10  # discard buffer for values a PUT could not store
_LINGER_S = 1.0  # after an error frame: how long we keep reading so the peer gets to see it
_LINGER_BYTES = 16 << 20


class NodeServer:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.arena = Arena(config.capacity)
        self.store = Store(self.arena)
        self.metrics = NodeMetrics(config.node_id, self.stats)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()  # draining: connections finish what has arrived, then close
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
            self.metrics_address = self.metrics.serve(self.config.metrics_listen)
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
            threads = list(self._conns.values())
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
                sock, _addr = self._listener.accept()
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
            with self._conns_lock:
                full = len(self._conns) >= self.config.max_connections
            if full:  # one thread per connection: refuse rather than let a flood exhaust the host
                self.metrics.protocol_errors.labels(self._m_node, "too_many_connections").inc()
                log.warning("refusing a connection from %s: %d open (--max-connections)", _peer(sock), self.config.max_connections)
                self._send_error(sock, 0, ErrorCode.LIMIT, f"node has {self.config.max_connections} connections open; try later")
                sock.close()
                continue
            tune(sock)
            t = threading.Thread(target=self._serve_conn, args=(sock,), name="memkv-conn", daemon=True)
            with self._conns_lock:
                self._conns[sock] = t
            self.metrics.accepted.labels(self._m_node).inc()
            t.start()

    # ------------------------------------------------------------------ one connection

    def _serve_conn(self, sock: socket.socket) -> None:
        node = self._m_node
        self.metrics.connections.labels(node).inc()
        proto = ServerProtocol(self.config.node_id, self.config.auth_key)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        request_id = 0
        failed = False  # an error frame went out: close with a bounded linger so the peer can read it
        try:
            send_views(sock, [proto.hello()], time.monotonic() + self.config.frame_timeout_s)
            authed = False
            idle_since = time.monotonic()
            while True:
                stopping = self._stopping.is_set()
                # Draining: serve what has already arrived (pipelined requests are in flight
                # too), then say why we hang up.
                if not poller.poll(0 if stopping else _POLL_MS):
                    if stopping:
                        if authed:
                            self._send_error(sock, 0, ErrorCode.SHUTTING_DOWN, "node is shutting down")
                        return
                    idle = self.config.idle_timeout_s
                    if idle and time.monotonic() - idle_since > idle:
                        return
                    if not authed and time.monotonic() - idle_since > self.config.frame_timeout_s:
                        raise ProtocolError("no AUTH within the frame timeout", ErrorCode.TIMEOUT)
                    continue
                # From a frame's first byte, the whole frame must arrive within the frame timeout.
                deadline = time.monotonic() + self.config.frame_timeout_s
                head = recv_exact(sock, HEADER_LEN, deadline)
                header = decode_header(head, self.config.limits)
                request_id = header.request_id
                if not authed:
                    if header.meta_len > _MAX_AUTH_META:  # an AUTH frame is tiny: read no more before it
                        raise ProtocolError(
                            f"frame of {header.meta_len} meta bytes before authentication", ErrorCode.AUTH_REQUIRED
                        )
                    meta = recv_exact(sock, header.meta_len, deadline)
                    try:
                        reply = proto.on_auth(header, decode(header, meta, self.config.limits))
                    except ProtocolError as exc:
                        self.metrics.auth_failures.labels(node).inc()
                        log.warning("auth failure from %s: %s", _peer(sock), exc)
                        raise
                    send_views(sock, [reply], deadline)
                    authed = True
                else:
                    proto.check_request(header)
                    self._serve_request(sock, header, deadline)
                idle_since = time.monotonic()
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
            self.metrics.connections.labels(node).dec()

    def _send_error(self, sock: socket.socket, request_id: int, code: int, message: str) -> None:
        try:
            send_views(sock, [encode(ErrorFrame(code=code, message=message), request_id)], time.monotonic() + 1.0)
        except (OSError, MemKVTimeout):
            pass

    def _serve_request(self, sock: socket.socket, header: Header, deadline: float) -> None:
        started = time.perf_counter()
        meta = recv_exact(sock, header.meta_len, deadline)
        msg = decode(header, meta, self.config.limits)
        op = header.base_op
        rid = header.request_id
        outcome = "ok"
        if isinstance(msg, PutRequest):
            outcome = self._put(sock, rid, msg, deadline)
        elif isinstance(msg, GetRequest):
            outcome = self._get(sock, rid, msg, deadline)
        else:
            reply = self._inline(msg)
            send_views(sock, [encode(reply, rid)], deadline)
        labels = (self._m_node, op.name.lower())
        self.metrics.ops.labels(*labels, outcome).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    def _put(self, sock: socket.socket, rid: int, msg: PutRequest, deadline: float) -> str:
        reserved: list[Extent | Status] = []
        try:
            for size in msg.sizes:
                reserved.append(self.store.reserve(size))
            view = self.arena.view
            scratch: memoryview | None = None  # only a refused value needs it; most requests never do
            for size, slot in zip(msg.sizes, reserved, strict=True):
                if isinstance(slot, Extent):
                    recv_into_exact(sock, view[slot.offset : slot.offset + size], deadline)
                else:
                    if scratch is None:
                        scratch = memoryview(bytearray(min(_SCRATCH, max(size, 1))))
                    drain(sock, size, scratch, deadline)
        except BaseException:
            for slot in reserved:
                if isinstance(slot, Extent):
                    self.store.abort(slot)
            raise
        statuses: list[Status] = []
        for key, slot in zip(msg.keys, reserved, strict=True):
            if isinstance(slot, Extent):
                self.store.publish(key, slot)
                statuses.append(Status.OK)
            else:
                statuses.append(slot)
        self.metrics.bytes_in.labels(self._m_node).inc(sum(msg.sizes))
        self.metrics.items.labels(self._m_node, "put").inc(len(msg.keys))
        send_views(sock, [encode(PutResponse(statuses=statuses), rid)], deadline)
        return "ok" if all(s == Status.OK for s in statuses) else "partial"

    def _get(self, sock: socket.socket, rid: int, msg: GetRequest, deadline: float) -> str:
        pinned: list[Extent] = []
        statuses: list[Status] = []
        lengths: list[int] = []
        try:
            for key, cap in zip(msg.keys, msg.capacities, strict=True):
                status, ext = self.store.pin(key, cap)
                statuses.append(status)
                lengths.append(ext.length if ext else 0)
                if ext is not None:
                    pinned.append(ext)
            view = self.arena.view
            head = encode(GetResponse(statuses=statuses, lengths=lengths), rid)
            # Pinned extents stay put until unpinned, so an overwrite cannot tear what we send.
            send_views(sock, [head, *(view[e.offset : e.offset + e.length] for e in pinned)], deadline)
        finally:
            if pinned:
                self.store.unpin(pinned)
        sent = sum(e.length for e in pinned)
        self.metrics.bytes_out.labels(self._m_node).inc(sent)
        self.metrics.items.labels(self._m_node, "get").inc(len(msg.keys))
        return "ok" if len(pinned) == len(msg.keys) else "partial"

    def _inline(self, msg: Message) -> Message:
        if isinstance(msg, ExistsRequest):
            found = self.store.exists(msg.keys, msg.lease_ttl_ms / 1000.0)
            return ExistsResponse(statuses=[s for s, _ in found], lengths=[n for _, n in found])
        if isinstance(msg, ReleaseRequest):
            return ReleaseResponse(statuses=self.store.release(msg.keys))
        if isinstance(msg, DeleteRequest):
            return DeleteResponse(statuses=self.store.delete(msg.keys))
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
