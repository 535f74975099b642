"""Thread-safe client for one node: a pool of connections and batch operations with deadlines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from lmcache_memkv.client.connection import Connection
from lmcache_memkv.errors import ConnectError, MemKVError, MemKVTimeout, ProtocolError
from lmcache_memkv.transport.tcp import Buffer
from lmcache_memkv.wire.constants import Status
from lmcache_memkv.wire.messages import (
    DeleteRequest,
    DeleteResponse,
    ExistsRequest,
    ExistsResponse,
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

M = TypeVar("M", bound=Message)


class NodeClient:
    """Batch operations against one node. Safe to share between threads.

    Every call is bounded by ``timeout_s`` (connect included); on any transport error the
    connection is dropped, never reused, and the error names the node.
    """

    def __init__(self, endpoint: str, key: bytes | None = None, timeout_s: float = 5.0, max_idle: int = 16) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._key = key
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ pool

    @contextmanager
    def _conn(self, timeout_s: float | None) -> Iterator[tuple[Connection, float]]:
        if self._closed:
            raise ConnectError(f"client for memkv node {self.endpoint} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = Connection(self.endpoint, self._key, budget)
            yield conn, deadline
        except MemKVError:
            raise
        except TimeoutError:
            raise MemKVTimeout(f"memkv node {self.endpoint}: no answer within {budget:.1f}s") from None
        except OSError as exc:
            raise ConnectError(f"memkv node {self.endpoint}: {exc.strerror or exc}") from None
        finally:
            if conn is not None:
                if conn.broken or self._closed:
                    conn.close()
                else:
                    with self._lock:
                        if len(self._idle) < self._max_idle:
                            self._idle.append(conn)
                            conn = None
                    if conn is not None:
                        conn.close()

    def _call(self, msg: Message, kind: type[M], timeout_s: float | None, payload: Sequence[Buffer] = ()) -> M:
        with self._conn(timeout_s) as (conn, deadline):
            reply = conn.call(msg, deadline, payload)
        if not isinstance(reply, kind):
            raise ProtocolError(f"memkv node {self.endpoint}: unexpected {type(reply).__name__}")
        return reply

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ operations

    def put(self, keys: Sequence[bytes], values: Sequence[Buffer], timeout_s: float | None = None) -> list[Status]:
        """Store ``values`` under ``keys`` (overwrite is idempotent); a status per key."""
        if len(keys) != len(values):
            raise ValueError(f"put: {len(keys)} keys but {len(values)} values")
        views = [memoryview(v).cast("B") for v in values]
        reply = self._call(PutRequest(keys=keys, sizes=[v.nbytes for v in views]), PutResponse, timeout_s, views)
        return list(reply.statuses)

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Buffer], timeout_s: float | None = None) -> list[int | None]:
        """Read each value straight into its buffer; per key the length read, or None on a miss.

        A value larger than its buffer is a miss (the node checks before sending).
        """
        if len(keys) != len(buffers):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        views = [memoryview(b).cast("B") for b in buffers]
        for v in views:
            if v.readonly:
                raise ValueError("get_into needs writable buffers")
        with self._conn(timeout_s) as (conn, deadline):
            return conn.get_into(keys, views, deadline)

    def exists(self, keys: Sequence[bytes], lease_ttl_s: float = 0.0, timeout_s: float | None = None) -> list[int | None]:
        """Per key its value length, or None; with ``lease_ttl_s`` each found key is also leased."""
        ttl_ms = int(round(lease_ttl_s * 1000))
        if lease_ttl_s > 0 and ttl_ms == 0:
            ttl_ms = 1
        reply = self._call(ExistsRequest(keys=keys, lease_ttl_ms=ttl_ms), ExistsResponse, timeout_s)
        return [n if s == Status.OK else None for s, n in zip(reply.statuses, reply.lengths)]

    def release(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[bool]:
        """Release one lease per key; False where the key held none (or expired)."""
        reply = self._call(ReleaseRequest(keys=keys), ReleaseResponse, timeout_s)
        return [s == Status.OK for s in reply.statuses]

    def delete(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[bool]:
        reply = self._call(DeleteRequest(keys=keys), DeleteResponse, timeout_s)
        return [s == Status.OK for s in reply.statuses]

    def list_keys(
        self, prefix: bytes = b"", cursor: bytes = b"", limit: int = 1000, timeout_s: float | None = None
    ) -> tuple[list[tuple[bytes, int]], bytes]:
        """One page of ``(key, size)`` and the cursor for the next page (empty when done)."""
        reply = self._call(ListRequest(prefix=prefix, cursor=cursor, limit=limit), ListResponse, timeout_s)
        return list(zip(reply.keys, reply.sizes)), reply.next_cursor

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
        self._call(PingRequest(data=b"memkv"), PingResponse, timeout_s)
        return time.perf_counter() - started

    def stats(self, timeout_s: float | None = None) -> dict[str, int | str]:
        reply = self._call(StatsRequest(), StatsResponse, timeout_s)
        try:
            body = json.loads(reply.body)
        except ValueError:
            raise ProtocolError(f"memkv node {self.endpoint}: STATS body is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"memkv node {self.endpoint}: STATS body is not an object")
        return body
