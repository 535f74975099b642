"""The RDMA data client: the same ``DataClient`` protocol as ``NodeClient``, value bytes moved by verbs.

``RdmaSide`` is the process's verbs side, set up once: the device opened, the caller's buffer
pool (LMCache's L1 pool, ``L1MemoryDesc.ptr/size``) registered once for remote READ and WRITE.
``RdmaDataClient`` talks to one node: requests and answers travel on the node's TCP data socket
(a ``NodeClient`` underneath, which also serves EXISTS, RELEASE, DELETE and LIST); a PUT names,
per value, where it sits in the registered pool (address = base + offset, the pool's rkey) and
the node RDMA-READs it; a GET names the pages to fill and the node RDMA-WRITEs them before it
answers. The queue pair is set up over the node's ``Session.Hello`` (mutually authenticated:
our proof in the call metadata, the node's answer signed and its ``server_proof`` over our nonce).

Fencing: when a PUT or GET fails or times out, this side's queue pair goes to the error state
before the call returns, so the node can no longer READ a page LMCache is about to reuse, nor
WRITE into a page after the load has reported a miss. The next call sets up a new session.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from lmcache_memkv.client.node_client import NodeClient, check_keys, put_batches
from lmcache_memkv.client.protocol import Buffer, DataClient
from lmcache_memkv.control import auth
from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.response_auth import HELLO, ReplyRefused
from lmcache_memkv.errors import AuthError, ConnectError, MemKVError, MemKVTimeout, ProtocolError, ServerError
from lmcache_memkv.proto.memkv.v1 import session_pb2, session_pb2_grpc
from lmcache_memkv.transport.rdma import QpInfo, QueuePair, VerbsDevice, buffer_address
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import VERSION, ErrorCode, Status
from lmcache_memkv.wire.messages import (
    ExistsResponse,
    GetResponse,
    RdmaGetRequest,
    RdmaGetResponse,
    RdmaPutRequest,
    RdmaPutResponse,
)

log = logging.getLogger("memkv.client.rdma")
_NONCE = 32
# A node refusing Hellos for lack of room (RESOURCE_EXHAUSTED): no new Hello to it before this
# back-off, doubling per refusal, so a full session table is not hammered by every call.
_HELLO_BACKOFF_S = 0.5
_HELLO_BACKOFF_MAX_S = 30.0
# transport auto: a node whose verbs path does not work from here (transfers fail on a fresh
# session: no route, wrong GID; or its device is unusable) is served over TCP this long, then
# verbs are tried again (the path may have been fixed; a retry costs one failed call).
_TCP_FALLBACK_S = 60.0


class HelloRefused(ConnectError):
    """The node answered Session.Hello with a refusal; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code
# transport, direction (store, load), bytes: what actually moved over which transport, per node call
ByteCounter = Callable[[str, str, int], None]


class RdmaSide:
    """The process's verbs device and its one registered buffer pool."""

    def __init__(self, device: str, port: int, gid_index: int, pool_addr: int, pool_len: int) -> None:
        self.device = VerbsDevice(device, port, gid_index)
        try:
            self.region = self.device.register(pool_addr, pool_len, remote=True)
        except BaseException:
            self.device.close()
            raise

    def locate(self, view: memoryview, what: str) -> int:
        """The address of a buffer inside the registered pool (ValueError if it is not in it)."""
        addr, length = buffer_address(view)
        if not self.region.contains(addr, length):
            raise ValueError(f"{what}: buffer at 0x{addr:x}+{length} is outside the registered RDMA region")
        return addr

    def close(self) -> None:
        self.device.close()


class RdmaDataClient:
    """``DataClient`` for one node over verbs. Safe to share between threads (one session each)."""

    def __init__(
        self,
        member: Member,
        key: bytes | None,
        timeout_s: float,
        client_id: bytes,
        side: RdmaSide,
        channels: ChannelPool,
        on_bytes: ByteCounter | None = None,
        fallback: bool = False,
    ) -> None:
        """``fallback`` (transport auto): when verbs do not work to this node, use TCP for a while;
        without it (transport rdma) such calls keep failing, logged with the reason."""
        self.endpoint = member.data_endpoint
        self.control_endpoint = member.control_endpoint
        self.node_id = member.node_id
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._key = key
        self._side = side
        self._channels = channels
        self._tcp: NodeClient = (
            CountingNodeClient(member.data_endpoint, key, timeout_s, client_id, on_bytes)
            if on_bytes is not None
            else NodeClient(member.data_endpoint, key, timeout_s, client_id)
        )  # the request socket; with ``fallback`` also the value path while verbs are off
        self._on_bytes = on_bytes
        self._session: tuple[int, QueuePair] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._hello_backoff_s = 0.0  # current back-off after RESOURCE_EXHAUSTED (0: none)
        self._hello_not_before = 0.0  # monotonic time before which no Hello is sent
        self._fallback = fallback
        self._tcp_until = 0.0  # monotonic: values go over TCP until then (fallback only)
        self._proven = 0  # id of the last session that completed a transfer (0: none)

    # ------------------------------------------------------------------ session

    def _hello(self, deadline: float) -> tuple[int, QueuePair]:
        qp = self._side.device.create_qp()
        try:
            mine = qp.info
            region = self._side.region
            nonce = os.urandom(_NONCE)
            request = session_pb2.HelloRequest(
                client_id=self.client_id.hex(),
                protocol_version=VERSION,
                transports=["rdma"],
                client_nonce=nonce,
                rdma_endpoint=session_pb2.RdmaEndpoint(
                    lid=mine.lid, gid=mine.gid, qp_num=mine.qp_num, psn=mine.psn, mtu=mine.mtu, gid_index=mine.gid_index
                ),
                memory_regions=[session_pb2.MemoryRegion(addr=region.addr, length=region.length, rkey=region.rkey)],
            )
            left = max(0.05, deadline - time.monotonic())
            stub = session_pb2_grpc.SessionStub(self._channels.get(self.control_endpoint))
            try:
                # No wait_for_ready: with it a dead node would cost the whole deadline on every
                # call; a slow first handshake is covered by the channel's reconnect backoff.
                reply = stub.Hello(request, timeout=left)
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                raise HelloRefused(
                    f"memkv node {self.endpoint}: RDMA session set-up (Session.Hello at {self.control_endpoint}) failed: "
                    f"{describe_rpc_error(exc)}",
                    code,
                ) from None
            try:
                self._channels.check_reply(HELLO, request, reply)
            except ReplyRefused as exc:
                raise AuthError(f"memkv node {self.endpoint}: {exc}") from None
            if self._key is not None:
                want = auth.session_proof(self._key, nonce)
                if not hmac.compare_digest(want, bytes(reply.server_proof)):
                    raise AuthError(f"memkv node {self.endpoint}: Session.Hello answer does not prove the key")
            if reply.transport != "rdma" or not reply.HasField("rdma_endpoint") or not reply.session_id:
                raise ConnectError(f"memkv node {self.endpoint} did not set up an RDMA session (transport {reply.transport!r})")
            ep = reply.rdma_endpoint
            peer = QpInfo(qp_num=ep.qp_num, gid=bytes(ep.gid), psn=ep.psn, mtu=ep.mtu, lid=ep.lid, gid_index=ep.gid_index)
            try:
                qp.connect(peer)  # checks every field first
            except ValueError as exc:
                raise ProtocolError(f"memkv node {self.endpoint}: bad RDMA endpoint in Session.Hello: {exc}") from None
            return int(reply.session_id), qp
        except BaseException:
            qp.close()
            raise

    def _current(self, deadline: float) -> tuple[int, QueuePair]:
        # One Hello at a time; others wait for its session, but never past their own deadline.
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise MemKVTimeout(f"memkv node {self.endpoint}: RDMA session set-up by another call did not finish in time")
        try:
            if self._closed:
                raise ConnectError(f"client for memkv node {self.endpoint} is closed")
            if self._session is None or self._session[1].fenced:
                old, self._session = self._session, None
                if old is not None:
                    old[1].close()  # fenced by abort_transfers under a call that then succeeded
                if time.monotonic() < self._hello_not_before:
                    raise ConnectError(
                        f"memkv node {self.endpoint}: its RDMA sessions are all in use; next try in "
                        f"{self._hello_not_before - time.monotonic():.1f}s"
                    )
                try:
                    self._session = self._hello(deadline)
                except HelloRefused as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self._hello_backoff_s = min(_HELLO_BACKOFF_MAX_S, self._hello_backoff_s * 2 or _HELLO_BACKOFF_S)
                        self._hello_not_before = time.monotonic() + self._hello_backoff_s
                        log.warning("%s; no new Hello for %.1fs", exc, self._hello_backoff_s)
                    raise
                self._hello_backoff_s = 0.0
            return self._session
        finally:
            self._lock.release()

    def _fence(self, session: tuple[int, QueuePair], why: BaseException, deadline: float) -> None:
        """Our queue pair to ERR before the failed call returns: no late access to our pages."""
        session[1].fence()  # first: it needs no lock, and the pages are safe once it returns
        # Forget the session if we can get the lock before the call's deadline (a Hello under
        # way may hold it); if not, _current sees the fenced QP and replaces it anyway.
        if self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                if self._session is session:
                    self._session = None
            finally:
                self._lock.release()
        log.info("memkv node %s: RDMA session fenced after %s: %s", self.endpoint, type(why).__name__, why)
        session[1].close()

    def abort_transfers(self) -> None:
        """Fence the current session now, from the caller's thread: a call still running (its
        lane thread maybe starved) must not let the node's RGET WRITE into a page LMCache is
        about to reuse. No lock: a Hello under way may hold it; its new QP is not in use yet."""
        session = self._session
        if session is not None:
            session[1].fence()  # the running call sees the fence and drops the session itself

    def _run(self, what: str, timeout_s: float | None, body: Callable[[int, float], object]) -> object:
        budget = self.timeout_s if timeout_s is None else timeout_s
        if budget <= 0:
            raise ValueError(f"timeout_s must be positive, got {budget}")
        deadline = time.monotonic() + budget
        for attempt in (0, 1):
            try:
                session = self._current(deadline)
            except HelloRefused as exc:
                # UNAVAILABLE: the node's device is unusable (or the node is unreachable: then TCP
                # fails too, harmlessly); FAILED_PRECONDITION: it has no verbs device.
                if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
                    self._verbs_failed(exc)
                raise
            try:
                out = body(session[0], deadline)
                self._proven = session[0]
                return out
            except ServerError as exc:
                self._fence(session, exc, deadline)
                if exc.code == ErrorCode.NO_SESSION and attempt == 0 and time.monotonic() < deadline:
                    continue  # the node dropped our session (fenced, restarted, evicted): set up a new one
                if exc.code in (ErrorCode.INTERNAL, ErrorCode.TIMEOUT) and self._proven != session[0]:
                    self._verbs_failed(exc)  # the node's transfer failed on a session that never moved a byte
                raise
            except BaseException as exc:
                self._fence(session, exc, deadline)
                if isinstance(exc, MemKVTimeout) and self._proven != session[0]:
                    self._verbs_failed(exc)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _verbs_failed(self, why: BaseException) -> None:
        """Verbs to this node failed before any transfer worked: with ``fallback``, TCP for a
        while (sticky: no verbs retry per call); else the calls keep failing, with the reason."""
        if self._fallback:
            self._tcp_until = time.monotonic() + _TCP_FALLBACK_S
            log.warning(
                "memkv node %s: RDMA does not work from here (%s); moving its values over TCP for %.0fs, then trying RDMA again",
                self.endpoint, why, _TCP_FALLBACK_S,
            )  # fmt: skip
        else:
            log.warning("memkv node %s: RDMA does not work from here (%s); transport rdma is required, so its calls fail", self.endpoint, why)

    def tcp_only(self) -> bool:
        """True while values to this node go over TCP (transport auto, after verbs failed)."""
        return self._fallback and time.monotonic() < self._tcp_until

    # ------------------------------------------------------------------ value bytes over verbs

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Buffer],
        timeout_s: float | None = None,
        versions: Sequence[int] | None = None,
    ) -> list[Status]:
        if self.tcp_only():
            return self._tcp.put(keys, values, timeout_s, versions)
        if len(keys) != len(values):
            raise ValueError(f"put: {len(keys)} keys but {len(values)} values")
        check_keys(keys, "put")
        views = [memoryview(v).cast("B") for v in values]
        sizes = [v.nbytes for v in views]
        addrs = [self._side.locate(v, f"put: value #{i}") for i, v in enumerate(views)]
        vers = list(versions) if versions is not None else CLOCK.next(len(keys))
        if len(vers) != len(keys):
            raise ValueError(f"put: {len(keys)} keys but {len(vers)} versions")
        rkey = self._side.region.rkey
        what = f"RDMA PUT of {len(keys)} keys"

        def body(session: int, deadline: float) -> list[Status]:
            out: list[Status] = []
            with self._tcp.connection(what, max(0.001, deadline - time.monotonic())) as (conn, _):
                for part in put_batches(keys, sizes, conn.hello):
                    sl = slice(part.start, part.stop)
                    msg = RdmaPutRequest(session=session, keys=keys[sl], sizes=sizes[sl], versions=vers[sl],
                                         addrs=addrs[sl], rkeys=[rkey] * len(part))  # fmt: skip
                    reply = conn.call(msg, deadline)
                    if not isinstance(reply, RdmaPutResponse) or len(reply.statuses) != len(part):
                        raise ProtocolError(f"memkv node {self.endpoint}: {what} got a malformed answer")
                    out += reply.statuses
            return out

        statuses = self._run(what, timeout_s, body)
        assert isinstance(statuses, list)
        if self._on_bytes is not None:
            self._on_bytes("rdma", "store", sum(n for n, s in zip(sizes, statuses, strict=True) if s == Status.OK))
        return statuses

    def read_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None, exact: bool = False
    ) -> GetResponse:
        if self.tcp_only():
            return self._tcp.read_into(keys, buffers, timeout_s, exact)
        if len(keys) != len(buffers):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        check_keys(keys, "get_into")
        views = [memoryview(b).cast("B") for b in buffers]
        for i, v in enumerate(views):
            if v.readonly:
                raise ValueError(f"get_into: buffer #{i} is read-only; pass writable buffers")
        addrs = [self._side.locate(v, f"get_into: buffer #{i}") for i, v in enumerate(views)]
        caps = [v.nbytes for v in views]
        rkey = self._side.region.rkey
        what = f"RDMA GET of {len(keys)} keys"

        def body(session: int, deadline: float) -> GetResponse:
            msg = RdmaGetRequest(session=session, keys=keys, capacities=caps, addrs=addrs, rkeys=[rkey] * len(keys), exact=exact)
            with self._tcp.connection(what, max(0.001, deadline - time.monotonic())) as (conn, _):
                reply = conn.call(msg, deadline)
            if not isinstance(reply, RdmaGetResponse) or len(reply.statuses) != len(keys):
                raise ProtocolError(f"memkv node {self.endpoint}: {what} got a malformed answer")
            for status, length, cap in zip(reply.statuses, reply.lengths, caps, strict=True):
                if status == Status.OK and (length > cap or (exact and length != cap)):
                    # The node claims a value its page could not hold: never trust such an answer.
                    raise ProtocolError(f"memkv node {self.endpoint}: value of {length} bytes for a {cap}-byte buffer")
            return reply

        reply = self._run(what, timeout_s, body)
        assert isinstance(reply, GetResponse)
        CLOCK.observe(reply.versions)
        if self._on_bytes is not None:
            self._on_bytes("rdma", "load", sum(n for n, s in zip(reply.lengths, reply.statuses, strict=True) if s == Status.OK))
        return reply

    # ------------------------------------------------------------------ no value bytes: the TCP socket

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse:
        return self._tcp.lookup(keys, lease_ttl_s, timeout_s)

    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> list[bool]:
        return self._tcp.release(lease_ids, timeout_s)

    def delete_versions(self, keys: Sequence[bytes], versions: Sequence[int], timeout_s: float | None = None) -> list[Status]:
        return self._tcp.delete_versions(keys, versions, timeout_s)

    def list_keys(
        self, prefix: bytes = b"", cursor: bytes = b"", limit: int = 1000, timeout_s: float | None = None
    ) -> tuple[list[tuple[bytes, int]], bytes]:
        return self._tcp.list_keys(prefix, cursor, limit, timeout_s)

    def stats(self, timeout_s: float | None = None) -> dict[str, int | str]:
        return self._tcp.stats(timeout_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            session, self._session = self._session, None
        if session is not None:
            session[1].close()
        self._tcp.close()


class CountingNodeClient(NodeClient):
    """``NodeClient`` that reports the value bytes it moved (the TCP side of ``memkv_l2_wire_bytes``)."""

    def __init__(self, endpoint: str, key: bytes | None, timeout_s: float, client_id: bytes, on_bytes: ByteCounter) -> None:
        super().__init__(endpoint, key, timeout_s, client_id)
        self._on_bytes = on_bytes

    def put(
        self, keys: Sequence[bytes], values: Sequence[Buffer], timeout_s: float | None = None, versions: Sequence[int] | None = None
    ) -> list[Status]:
        out = super().put(keys, values, timeout_s, versions)
        self._on_bytes("tcp", "store", sum(memoryview(v).nbytes for v, s in zip(values, out, strict=True) if s == Status.OK))
        return out

    def read_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None, exact: bool = False
    ) -> GetResponse:
        reply = super().read_into(keys, buffers, timeout_s, exact)
        self._on_bytes("tcp", "load", sum(n for n, s in zip(reply.lengths, reply.statuses, strict=True) if s == Status.OK))
        return reply


MemberClientFactory = Callable[[Member, "bytes | None", float, bytes], DataClient]


class TransportChooser:
    """Makes the data client for one member: verbs where the node advertises "rdma" (or always,
    with ``require``: a node without it then fails its calls, naming why), else TCP."""

    def __init__(self, side: RdmaSide | None, channels: ChannelPool | None, require: bool, on_bytes: ByteCounter | None = None) -> None:
        if require and side is None:
            raise ValueError("transport rdma needs the verbs side")
        self.side = side
        self._channels = channels
        self._require = require
        self._on_bytes = on_bytes

    def transport_for(self, member: Member) -> str:
        if self.side is not None and (self._require or "rdma" in member.transports):
            return "rdma"
        return "tcp"

    def __call__(self, member: Member, key: bytes | None, timeout_s: float, client_id: bytes) -> DataClient:
        if self.transport_for(member) == "rdma":
            assert self.side is not None and self._channels is not None
            return RdmaDataClient(
                member, key, timeout_s, client_id, self.side, self._channels, self._on_bytes, fallback=not self._require
            )
        if self._on_bytes is not None:
            return CountingNodeClient(member.data_endpoint, key, timeout_s, client_id, self._on_bytes)
        return NodeClient(member.data_endpoint, key, timeout_s, client_id)

    def close(self) -> None:
        if self._channels is not None:
            self._channels.close()
        if self.side is not None:
            self.side.close()


__all__ = ["CountingNodeClient", "MemKVError", "RdmaDataClient", "RdmaSide", "TransportChooser"]
