"""Keeps a client's view current through Cluster.Watch, moving to another member when a stream ends.

A node sends its view on every change and a keepalive in between; a stream that stays silent
for a few keepalive periods (a peer that vanished without closing the connection) is
cancelled by ``check_stale`` and the watcher reconnects elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import Member
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

log = logging.getLogger("memkv.cluster")
_RETRY_S = 0.5  # pause after every known endpoint failed
_DEFAULT_KEEPALIVE_S = 1.0
_STALE_KEEPALIVES = 3


class ViewWatcher:
    def __init__(
        self,
        pool: ChannelPool,
        endpoints: Callable[[str | None], list[str]],
        on_view: Callable[[int, list[Member]], None],
    ) -> None:
        """``endpoints(failed)`` lists control endpoints to try, in order, given the last one that failed."""
        self._pool = pool
        self._endpoints = endpoints
        self._on_view = on_view
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._endpoint: str | None = None
        self._last_message = 0.0
        self._keepalive_s = _DEFAULT_KEEPALIVE_S
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memkv-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def endpoint(self) -> str | None:
        """The member whose stream is open now."""
        with self._lock:
            return self._endpoint

    def silence(self) -> float | None:
        """Seconds since the open stream last spoke (None: no stream)."""
        with self._lock:
            return None if self._endpoint is None else time.monotonic() - self._last_message

    def check_stale(self) -> None:
        """Cancel a stream that has been silent for several keepalive periods."""
        with self._lock:
            call, endpoint = self._call, self._endpoint
            silent = time.monotonic() - self._last_message
            limit = _STALE_KEEPALIVES * self._keepalive_s
        if call is not None and silent > limit:
            log.info("view stream from %s silent for %.1fs; reconnecting elsewhere", endpoint, silent)
            call.cancel()

    def _run(self) -> None:
        failed: str | None = None
        while not self._stop.is_set():
            spoke = False
            for endpoint in self._endpoints(failed):
                if self._stop.is_set():
                    return
                spoke = self._stream(endpoint)
                failed = endpoint
                if spoke:
                    break  # the view may have changed: recompute whom to try next
            if not spoke:
                self._stop.wait(_RETRY_S)

    def _stream(self, endpoint: str) -> bool:
        """Follow one member's stream until it ends; True if it delivered anything."""
        spoke = False
        try:
            call = cluster_pb2_grpc.ClusterStub(self._pool.get(endpoint)).Watch(cluster_pb2.WatchRequest())
        except (RuntimeError, ValueError) as exc:  # pool closed, or an endpoint gRPC rejects
            log.debug("cannot watch %s: %s", endpoint, exc)
            return False
        with self._lock:
            if self._stop.is_set():
                call.cancel()
                return False
            self._call, self._endpoint, self._last_message = call, endpoint, time.monotonic()
        try:
            for reply in call:
                with self._lock:
                    self._last_message = time.monotonic()
                    if reply.keepalive_ms:
                        self._keepalive_s = reply.keepalive_ms / 1000
                spoke = True
                if reply.HasField("view"):
                    try:
                        epoch, members = view_from_proto(reply.view)
                    except ValueError as exc:
                        log.warning("ignoring a malformed view from %s: %s", endpoint, exc)
                        continue
                    self._on_view(epoch, members)
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                log.debug("view stream from %s ended: %s", endpoint, describe_rpc_error(exc))
        finally:
            with self._lock:
                self._call = self._endpoint = None
        return spoke
