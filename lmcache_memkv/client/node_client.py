"""Thread-safe client for one node: a pool of connections and batch operations with deadlines."""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

from lmcache_memkv.client.connection import Connection
from lmcache_memkv.client.protocol import DataClientFactory
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.errors import AuthError, ConnectError, MemKVError, MemKVTimeout, ProtocolError, ServerError
from lmcache_memkv.transport.tcp import Buffer
from lmcache_memkv.versions import CLOCK
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, MAX_KEY_LEN, ErrorCode, Status
from lmcache_memkv.wire.messages import (
    DeleteRequest,
    DeleteResponse,
    ExistsRequest,
    ExistsResponse,
    GetResponse,
    Hello,
    ListRequest,
    ListResponse,
    Message,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    ReleaseRequest,
    ReleaseResponse,
    StatsRequest,
    StatsResponse,
)

_OK = Status.OK  # hoisted: an enum member is an attribute lookup, and these compare per key
M = TypeVar("M", bound=Message)
_MAX_TTL_MS = 0xFFFFFFFF  # the wire carries the lease TTL as u32 milliseconds
_META_PER_KEY = 2 + 16  # key length + size + version, besides the key itself


def put_batches(keys: Sequence[bytes], sizes: Sequence[int], hello: Hello) -> list[range]:
    """Split a PUT so each request fits the node's batch, meta and payload limits (from its HELLO).

    A value over the payload limit goes alone; the node refuses it, and says why.
    """
    out: list[range] = []
    start, payload, meta = 0, 0, 4
    for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        item = len(key) + _META_PER_KEY
        if i > start and (
            i - start >= hello.max_batch or payload + size > hello.max_payload_len or meta + item > hello.max_meta_len
        ):
            out.append(range(start, i))
            start, payload, meta = i, 0, 4
        payload += size
        meta += item
    if start < len(keys):
        out.append(range(start, len(keys)))
    return out


_KEY_TYPES = frozenset({bytes, bytearray})


def check_keys(keys: Sequence[bytes], what: str) -> None:
    """Reject keys the node would drop the connection for, before anything is sent."""
    if not keys or (
        _KEY_TYPES.issuperset(map(type, keys)) and 0 < min(map(len, keys)) and max(map(len, keys)) <= MAX_KEY_LEN
    ):
        return  # the common case, checked by C-level iterators; the loop below names the culprit
    for i, key in enumerate(keys):
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"{what}: key #{i} must be bytes, got {type(key).__name__}")
        if not 0 < len(key) <= MAX_KEY_LEN:
            raise ValueError(f"{what}: key #{i} is {len(key)} bytes; keys must be 1..{MAX_KEY_LEN} bytes")


class NodeClient:
    """Batch operations against one node. Safe to share between threads.

    Every call is bounded by ``timeout_s`` (connect included); on any transport error the
    connection is dropped, never reused, and the error names the node and the operation.
    """

    def __init__(
        self,
        endpoint: str,
        key: bytes | None = None,
        timeout_s: float = 5.0,
        client_id: bytes | None = None,
        max_idle: int = 16,
    ) -> None:
        """``client_id`` (16 bytes, random by default) owns the leases this client takes."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if client_id is not None and len(client_id) != CLIENT_ID_LEN:
            raise ValueError(f"client_id must be {CLIENT_ID_LEN} bytes")
        self.client_id = client_id if client_id is not None else os.urandom(CLIENT_ID_LEN)
        parse_endpoint(endpoint, field="node endpoint")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._key = key
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._fences = 0  # FENCED answers seen; a connection remembers the count it was opened under
        self._opened: weakref.WeakKeyDictionary[Connection, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ pool

    def _checkout(self) -> Connection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_stale():  # the node may have closed it while it sat idle
                    return conn
                conn.close()
        return None

    def _checkin(self, conn: Connection) -> None:
        if not conn.broken and not self._closed:
            with self._lock:
                # A connection opened before the node last said FENCED belongs to its old life.
                if self._opened.get(conn, -1) >= self._fences and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    @contextmanager
    def _conn(self, what: str, timeout_s: float | None) -> Iterator[tuple[Connection, float]]:
        if self._closed:
            raise ConnectError(f"client for memkv node {self.endpoint} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        if budget <= 0:
            raise ValueError(f"timeout_s must be positive, got {budget}")
        deadline = time.monotonic() + budget
        conn = self._checkout()
        try:
            if conn is None:
                fences = self._fences
                conn = Connection(self.endpoint, self._key, budget, self.client_id)
                self._opened[conn] = fences
            yield conn, deadline
        except MemKVTimeout as exc:
            raise MemKVTimeout(f"memkv node {self.endpoint}: {what} timed out after {budget:.1f}s ({exc})") from None
        except (AuthError, ServerError, ConnectError) as exc:
            if isinstance(exc, ServerError) and exc.code == ErrorCode.FENCED:
                with self._lock:
                    self._fences += 1  # connections opened before now are of the node's old life
                self._drop_idle()
            raise _where(exc, self.endpoint, what) from None
        except ProtocolError as exc:
            raise ProtocolError(_prefix(str(exc), self.endpoint, what), exc.code) from None
        except TimeoutError:
            raise MemKVTimeout(f"memkv node {self.endpoint}: {what} timed out after {budget:.1f}s") from None
        except OSError as exc:
            raise ConnectError(f"memkv node {self.endpoint}: {what} failed: {exc.strerror or exc}") from None
        finally:
            if conn is not None:
                self._checkin(conn)

    def connection(self, what: str, timeout_s: float | None) -> AbstractContextManager[tuple[Connection, float]]:
        """A pooled, authenticated connection and the call's deadline, with this client's error
        handling (the RDMA data client sends its requests through it)."""
        return self._conn(what, timeout_s)

    def _call(self, msg: Message, kind: type[M], what: str, timeout_s: float | None, payload: Sequence[Buffer] = ()) -> M:
        with self._conn(what, timeout_s) as (conn, deadline):
            reply = conn.call(msg, deadline, payload)
        if not isinstance(reply, kind):
            raise ProtocolError(f"memkv node {self.endpoint}: {what}: unexpected {type(reply).__name__}")
        return reply

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._drop_idle()

    def abort_transfers(self) -> None:
        """No-op: over TCP the node writes nothing into the caller's memory once a call returns."""

    # ------------------------------------------------------------------ operations

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Buffer],
        timeout_s: float | None = None,
        versions: Sequence[int] | None = None,
    ) -> list[Status]:
        """Store ``values`` under ``keys``; a status per key.

        Each value carries a version (fresh from this process's clock unless given): the node
        refuses it as STALE if it holds something newer. NO_SPACE and TOO_LARGE mean the node
        stored nothing and dropped any older value of the key.
        """
        if len(keys) != len(values):
            raise ValueError(f"put: {len(keys)} keys but {len(values)} values")
        check_keys(keys, "put")
        views = [memoryview(v).cast("B") for v in values]  # views, not copies: sendmsg gathers them
        sizes = [v.nbytes for v in views]
        vers = list(versions) if versions is not None else CLOCK.next(len(keys))
        if len(vers) != len(keys):
            raise ValueError(f"put: {len(keys)} keys but {len(vers)} versions")
        out: list[Status] = []
        with self._conn(f"PUT of {len(keys)} keys", timeout_s) as (conn, deadline):
            for part in put_batches(keys, sizes, conn.hello):
                msg = PutRequest(keys=keys[part.start : part.stop], sizes=sizes[part.start : part.stop], versions=vers[part.start : part.stop])
                reply = conn.call(msg, deadline, views[part.start : part.stop])
                if not isinstance(reply, PutResponse) or len(reply.statuses) != len(part):
                    raise ProtocolError(f"memkv node {self.endpoint}: PUT of {len(part)} keys got a malformed answer")
                out += reply.statuses
        return out

    def read_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None, exact: bool = False
    ) -> GetResponse:
        """Read each found value straight into its buffer; the node's statuses, lengths and versions.

        A value larger than its buffer is a miss; with ``exact``, one of any other length is
        WRONG_SIZE (nothing is sent for it).
        """
        if len(keys) != len(buffers):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        check_keys(keys, "get_into")
        views = [memoryview(b).cast("B") for b in buffers]
        for i, v in enumerate(views):
            if v.readonly:
                raise ValueError(f"get_into: buffer #{i} is read-only; pass writable buffers")
        with self._conn(f"GET of {len(keys)} keys", timeout_s) as (conn, deadline):
            reply = conn.get_into(keys, views, deadline, exact)
        CLOCK.observe(reply.versions)
        return reply

    def get_into(
        self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None
    ) -> list[int | None]:
        """Read each value straight into its buffer; per key the length read, or None on a miss."""
        reply = self.read_into(keys, buffers, timeout_s)
        return [n if s == _OK else None for s, n in zip(reply.statuses, reply.lengths, strict=True)]

    def lookup(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> ExistsResponse:
        """EXISTS: per key status, length, version and (with ``lease_ttl_s``) a lease id.

        The node caps the TTL; LEASE_LIMIT means found but not leased (this client's budget is spent).
        """
        check_keys(keys, "exists")
        ttl_ms = round(lease_ttl_s * 1000)
        if lease_ttl_s > 0 and ttl_ms == 0:
            ttl_ms = 1  # a tiny TTL still means "lease", not "no lease"
        if not 0 <= ttl_ms <= _MAX_TTL_MS:
            raise ValueError(f"exists: lease_ttl_s must be in 0..{_MAX_TTL_MS / 1000:.0f}, got {lease_ttl_s}")
        what = f"EXISTS of {len(keys)} keys"
        reply = self._call(ExistsRequest(keys=keys, lease_ttl_ms=ttl_ms), ExistsResponse, what, timeout_s)
        if len(reply.statuses) != len(keys):
            raise ProtocolError(f"memkv node {self.endpoint}: {what} got {len(reply.statuses)} answers")
        CLOCK.observe(reply.versions)
        return reply

    def exists(
        self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None
    ) -> list[int | None]:
        """Per key its value length, or None; with ``lease_ttl_s`` each found key is also leased."""
        reply = self.lookup(keys, lease_ttl_s, timeout_s)
        return [n if s == _OK else None for s, n in zip(reply.statuses, reply.lengths, strict=True)]

    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> list[bool]:
        """Release leases by id; False where this client holds no such lease (released, expired)."""
        what = f"RELEASE of {len(lease_ids)} leases"
        reply = self._call(ReleaseRequest(lease_ids=lease_ids), ReleaseResponse, what, timeout_s)
        return [s == _OK for s in reply.statuses]

    def delete_versions(
        self, keys: Sequence[bytes], versions: Sequence[int], timeout_s: float | None = None
    ) -> list[Status]:
        """Delete each key unless the node holds a newer version (STALE); MISS where it had none.

        Either way the node remembers the delete, so an older write arriving later is refused.
        """
        check_keys(keys, "delete")
        what = f"DELETE of {len(keys)} keys"
        reply = self._call(DeleteRequest(keys=keys, versions=versions), DeleteResponse, what, timeout_s)
        if len(reply.statuses) != len(keys):
            raise ProtocolError(f"memkv node {self.endpoint}: {what} got {len(reply.statuses)} answers")
        return list(reply.statuses)

    def delete(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[bool]:
        """Delete each key (leased or not) as of now; False where it was not there."""
        return [s == _OK for s in self.delete_versions(keys, CLOCK.next(len(keys)), timeout_s)]

    def list_keys(
        self, prefix: bytes = b"", cursor: bytes = b"", limit: int = 1000, timeout_s: float | None = None
    ) -> tuple[list[tuple[bytes, int]], bytes]:
        """One page of ``(key, size)`` and the cursor for the next page (empty when done)."""
        if limit <= 0:
            raise ValueError(f"list_keys: limit must be positive, got {limit}")
        msg = ListRequest(prefix=prefix, cursor=cursor, limit=limit)
        reply = self._call(msg, ListResponse, "LIST", timeout_s)
        return list(zip(reply.keys, reply.sizes, strict=True)), reply.next_cursor

    def iter_keys(self, prefix: bytes = b"", page: int = 1000) -> Iterator[tuple[bytes, int]]:
        cursor = b""
        while True:
            items, cursor = self.list_keys(prefix, cursor, page)
            yield from items
            if not cursor:
                return

    def ping(self, timeout_s: float | None = None) -> float:
        """Round-trip time in seconds."""
        started = time.perf_counter()
        self._call(PingRequest(data=b"memkv"), PingResponse, "PING", timeout_s)
        return time.perf_counter() - started

    def stats(self, timeout_s: float | None = None) -> dict[str, int | str]:
        reply = self._call(StatsRequest(), StatsResponse, "STATS", timeout_s)
        try:
            body = json.loads(reply.body)
        except ValueError:
            raise ProtocolError(f"memkv node {self.endpoint}: STATS body is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"memkv node {self.endpoint}: STATS body is not an object")
        return body


# NodeClient is the TCP data client the cluster client uses by default; mypy holds it to the protocol.
TCP_CLIENT: DataClientFactory = NodeClient


def _prefix(message: str, endpoint: str, what: str) -> str:
    """Name the node and the operation, without repeating the node if the message has it."""
    tag = f"memkv node {endpoint}"
    if message.startswith(tag):
        return f"{tag}: {what}: {message[len(tag) :].lstrip(': ')}"
    return f"{tag}: {what}: {message}"


def _where(exc: AuthError | ServerError | ConnectError, endpoint: str, what: str) -> MemKVError:
    message = str(exc)
    if endpoint in message and what in message:
        return exc
    message = f"{message} (during {what})" if endpoint in message else _prefix(message, endpoint, what)
    if isinstance(exc, ServerError):
        return ServerError(message, exc.code)
    return type(exc)(message)
