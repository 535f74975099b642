"""One authenticated data-plane connection to a node (blocking, used by one thread at a time)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence

from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.errors import ConnectError, MemKVTimeout, ProtocolError
from lmcache_memkv.transport.tcp import Buffer, PeerClosed, await_queued, read_frame, send_views, tune
from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.frames import Header
from lmcache_memkv.wire.limits import Limits
from lmcache_memkv.wire.messages import ErrorFrame, GetRequest, GetResponse, Hello, Message
from lmcache_memkv.wire.reader import FrameReader
from lmcache_memkv.wire.state import ClientProtocol

# The client accepts whatever a node may send; the node enforces the tighter limits.
_CLIENT_LIMITS = Limits(
    max_meta_len=64 << 20, max_batch=1 << 20, max_value_len=1 << 40, max_list_limit=1 << 20, max_payload_len=1 << 42
)
_IOV_MAX = 1024  # buffers per recvmsg_into (Linux's IOV_MAX)
_GATHER_FROM = 256 << 10  # GET answers at least this large are read once they are (mostly) queued
_ERROR_GRACE_S = 0.5  # after a failed send: how long we wait for the node's error frame explaining it


class Connection:
    def __init__(self, endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes | None = None) -> None:
        self.endpoint = endpoint
        host, port = parse_endpoint(endpoint, field="node endpoint")
        deadline = time.monotonic() + timeout_s
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout_s)
        except TimeoutError:
            raise MemKVTimeout(f"memkv node {endpoint}: connect timed out after {timeout_s:.1f}s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to memkv node {endpoint}: {exc.strerror or exc}") from None
        tune(self.sock)
        self.proto = ClientProtocol(key, where=f"memkv node {endpoint}", client_id=client_id)
        self._reader = FrameReader(_CLIENT_LIMITS)
        self.broken = False
        try:
            header, msg = self._read_frame(deadline)
            send_views(self.sock, [self.proto.on_hello(header, msg)], deadline)
            header, msg = self._read_frame(deadline)
            self.proto.on_auth_reply(header, msg)
        except BaseException:
            self.close()
            raise

    @property
    def node_id(self) -> str:
        return self.proto.node_id

    @property
    def hello(self) -> Hello:
        """The node's HELLO: its id and the limits a request must fit."""
        assert self.proto.hello is not None  # set by the handshake in __init__
        return self.proto.hello

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass

    def is_stale(self) -> bool:
        """True if an idle connection has input: EOF or an unsolicited error frame (e.g. shutdown)."""
        try:
            p = select.poll()
            p.register(self.sock, select.POLLIN)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    def _read_frame(self, deadline: float) -> tuple[Header, Message]:
        try:
            return read_frame(self.sock, self._reader, deadline)
        except PeerClosed as exc:
            raise ConnectError(f"memkv node {self.endpoint} closed the connection: {exc}") from None

    def _send(self, views: Sequence[Buffer], deadline: float) -> None:
        """Send a request; if the node hung up mid-send, raise its error frame's reason instead."""
        try:
            send_views(self.sock, views, deadline)
        except (BrokenPipeError, ConnectionResetError) as exc:
            try:
                header, msg = self._read_frame(min(deadline, time.monotonic() + _ERROR_GRACE_S))
            except (OSError, ProtocolError):
                raise exc from None
            if isinstance(msg, ErrorFrame):
                self.proto.on_response(header, msg)  # raises ServerError naming the node and its reason
            raise

    def call(self, msg: Message, deadline: float, payload: Sequence[Buffer] = ()) -> Message:
        """Send one request (plus value bytes) and read its response (without payload)."""
        _rid, head = self.proto.request(msg)
        try:
            self._send([head, *payload], deadline)
            header, reply = self._read_frame(deadline)
            if header.payload_len:
                raise ProtocolError(f"memkv node {self.endpoint}: unexpected payload on {header.base_op.name}")
            return self.proto.on_response(header, reply)
        except BaseException:
            self.close()
            raise

    def get_into(
        self, keys: Sequence[bytes], views: Sequence[memoryview], deadline: float, exact: bool = False
    ) -> GetResponse:
        """GET ``keys`` straight into ``views``; the node's per-key statuses, lengths and versions.

        Only OK entries carry bytes; with ``exact`` a stored value of another length is WRONG_SIZE.
        """
        _rid, head = self.proto.request(GetRequest(keys=keys, capacities=[v.nbytes for v in views], exact=exact))
        try:
            self._send([head], deadline)
            header, reply = self._read_frame(deadline)
            reply = self.proto.on_response(header, reply)
            if not isinstance(reply, GetResponse) or len(reply.statuses) != len(keys):
                raise ProtocolError(f"memkv node {self.endpoint}: GET of {len(keys)} keys got a malformed answer")
            dests = []
            incoming = 0
            for status, length, view in zip(reply.statuses, reply.lengths, views, strict=True):
                if status != Status.OK:
                    continue
                if length > view.nbytes or (exact and length != view.nbytes):
                    # The node broke its promise: never overrun (or half-fill) the buffer; the
                    # connection is dropped with the error, unread bytes and all.
                    raise ProtocolError(
                        f"memkv node {self.endpoint}: value of {length} bytes for a {view.nbytes}-byte buffer"
                    )
                if length:
                    dests.append(view[:length])
                    incoming += length
            if incoming >= _GATHER_FROM:
                await_queued(self.sock, incoming, deadline)  # one wake-up, not one per segment
            _recv_into_views(self.sock, dests, deadline)  # value bytes land in the callers' buffers
            return reply
        except PeerClosed as exc:
            self.close()
            raise ConnectError(f"memkv node {self.endpoint} closed the connection: {exc}") from None
        except BaseException:
            self.close()
            raise


def _recv_into_views(sock: socket.socket, views: list[memoryview], deadline: float) -> None:
    """Fill every view in order, scattering each read over as many of them as it covers
    (``recvmsg_into``): one call drains whatever has arrived, however many values it spans.

    The socket is read non-blocking and polled only when it has nothing: with a timeout set,
    Python spends an ioctl (settimeout) and a poll on every read, three system calls where one
    does while the body streams in."""
    i, total, got = 0, sum(v.nbytes for v in views), 0
    pending = list(views)  # byte views (callers cast): a partly filled one is replaced by its rest
    waiter: select.poll | None = None
    sock.settimeout(0.0)  # until the next call re-arms a timeout (send_views, read_frame)
    while i < len(pending):
        try:
            n = sock.recvmsg_into(pending[i : i + _IOV_MAX])[0]
        except (BlockingIOError, InterruptedError):
            remaining = deadline - time.monotonic()
            if waiter is None:
                waiter = select.poll()
                waiter.register(sock, select.POLLIN)
            if remaining <= 0 or not waiter.poll(max(1, int(remaining * 1000))):
                raise MemKVTimeout(f"timed out after receiving {got} of {total} value bytes") from None
            continue
        if n == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {total} value bytes")
        got += n
        while n:
            size = pending[i].nbytes
            if n < size:
                pending[i] = pending[i][n:]
                break
            n -= size
            i += 1
