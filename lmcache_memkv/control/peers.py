"""Calls a node makes to its peers: non-blocking futures with deadlines, at most one heartbeat
in flight per peer, so a silent peer never delays the others."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import grpc

from lmcache_memkv.control.channel import ChannelPool
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

    def join(self, endpoint: str, request: cluster_pb2.JoinRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).Join.future(request, timeout=timeout_s)

    def leave(self, endpoint: str, request: cluster_pb2.LeaveRequest, timeout_s: float) -> grpc.Future:
        return self._cluster(endpoint).Leave.future(request, timeout=timeout_s)

    def status(self, endpoint: str, timeout_s: float) -> grpc.Future:
        stub = maintenance_pb2_grpc.MaintenanceStub(self._pool.get(endpoint))
        return stub.Status.future(maintenance_pb2.StatusRequest(), timeout=timeout_s)

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
