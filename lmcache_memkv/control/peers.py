"""Calls a node makes to its peers: non-blocking futures with deadlines, at most one
anti-entropy exchange (``heartbeat``) in flight per peer, so a silent peer never delays the others. Callers check every answer with
``check_reply`` (the node's proof of the key) before using it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.message import Message

from lmcache_memkv.control.channel import ChannelPool
from lmcache_memkv.control.response_auth import fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc, maintenance_pb2, maintenance_pb2_grpc


class Peers:
    def __init__(self, pool: ChannelPool) -> None:
        self._pool = pool
        self._inflight: set[str] = set()
        self._lock = threading.Lock()

    def _cluster(self, endpoint: str) -> cluster_pb2_grpc.ClusterStub:
        return cluster_pb2_grpc.ClusterStub(self._pool.get(endpoint))

    def heartbeat(
        self,
        endpoint: str,
        request: cluster_pb2.HeartbeatRequest,
        timeout_s: float,
        done: Callable[[grpc.Future], None],
    ) -> bool:
        """Send unless the previous heartbeat to ``endpoint`` is still out; True if sent."""
        with self._lock:
            if endpoint in self._inflight:
                return False
            self._inflight.add(endpoint)

        def finished(future: grpc.Future) -> None:
            with self._lock:
                self._inflight.discard(endpoint)
            done(future)

        try:
            future = self._cluster(endpoint).Heartbeat.future(request, timeout=timeout_s)
        except BaseException:
            with self._lock:
                self._inflight.discard(endpoint)
            raise
        future.add_done_callback(finished)
        return True

    def ping(self, endpoint: str, request: cluster_pb2.PingRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).Ping.future(request, timeout=timeout_s)

    def ping_req(self, endpoint: str, request: cluster_pb2.PingReqRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).PingReq.future(request, timeout=timeout_s)

    def join(self, endpoint: str, request: cluster_pb2.JoinRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).Join.future(request, timeout=timeout_s)

    def leave(self, endpoint: str, request: cluster_pb2.LeaveRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).Leave.future(request, timeout=timeout_s)

    def status(self, endpoint: str, timeout_s: float) -> tuple[maintenance_pb2.StatusRequest, grpc.Future]:
        """The request sent (to check the answer against) and its future."""
        stub = maintenance_pb2_grpc.MaintenanceStub(self._pool.get(endpoint))
        request = maintenance_pb2.StatusRequest(nonce=fresh_nonce())
        return request, stub.Status.future(request, timeout=timeout_s)

    def check_reply(self, method: str, request: Message, reply: Message) -> None:
        """ReplyRefused unless the answer proves this node's key (see ``response_auth``)."""
        self._pool.check_reply(method, request, reply)

    def close(self) -> None:
        self._pool.close()


def wait_all(pending: Iterable[grpc.Future], timeout_s: float) -> list[grpc.Future]:
    """Wait for gRPC futures (not ``concurrent.futures``) up to a shared deadline; those done."""
    deadline = time.monotonic() + timeout_s
    done = []
    for future in pending:
        try:
            future.exception(timeout=max(0.0, deadline - time.monotonic()))
            done.append(future)
        except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
            pass
    return done


class LogThrottle:
    """Says whether to log about ``key`` now: at most once per ``every_s`` per key, and about at
    most ``max_keys`` keys per ``every_s`` in all, so neither the log nor this memory grows with
    what peers send."""

    def __init__(self, every_s: float = 60.0, max_keys: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[str, float] = {}  # key -> when last logged, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._last)

    def allow(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                return False
            self._last.pop(key, None)
            while self._last and now - next(iter(self._last.values())) >= self.every_s:
                del self._last[next(iter(self._last))]
            if len(self._last) >= self.max_keys:
                return False  # too many distinct keys this period: stay quiet rather than grow
            self._last[key] = now
            return True
