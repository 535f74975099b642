"""Keeps a client's view current through Cluster.Watch, moving to another member when a stream ends.

A node sends its view on every change and a keepalive in between; a stream that stays silent
for a few keepalive periods (a peer that vanished without closing the connection) is
cancelled by ``check_stale`` and the watcher reconnects elsewhere. With a key, every message
must carry the node's proof for this stream and its place in it (``response_auth``); a stream
that fails that, or sends a keepalive period out of range, is dropped and another member tried.

Views are merged record by record into the watcher's ``MemberTable`` (a lagging member cannot
undo a verdict the client already holds), and the client is handed the merged table. Answers
naming another cluster are refused (``ClusterIdentity``). Re-watching backs off exponentially
with full jitter (``Backoff``: 0.1 s doubling to 5 s), reset after a healthy stream, so the
sidecars of a member that went away come back spread out, not all at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from lmcache_memkv.cluster.backoff import Backoff
from lmcache_memkv.cluster.cluster_id import ClusterIdentity
from lmcache_memkv.cluster.members import MemberTable
from lmcache_memkv.control.channel import ChannelPool, describe_rpc_error
from lmcache_memkv.control.convert import view_from_proto
from lmcache_memkv.control.member import Member
from lmcache_memkv.control.peers import LogThrottle
from lmcache_memkv.control.response_auth import WATCH, fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

log = logging.getLogger("memkv.cluster")
_DEFAULT_KEEPALIVE_S = 1.0
_STALE_KEEPALIVES = 3
# A node's keepalive is max(1 s, its heartbeat interval); outside these bounds a stream could
# never be found stale (or would be dropped at once), so such a message is refused.
MIN_KEEPALIVE_MS = 10
MAX_KEEPALIVE_MS = 60_000


class ViewWatcher:
    def __init__(
        self,
        pool: ChannelPool,
        endpoints: Callable[[str | None], list[str]],
        on_view: Callable[[int, list[Member]], None],
        cluster: ClusterIdentity | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """``endpoints(failed)`` lists control endpoints to try, in order, given the last one that
        failed; ``on_view(epoch, members)`` gets the merged table after every view received."""
        self._pool = pool
        self._cluster = cluster if cluster is not None else ClusterIdentity()
        self._backoff = backoff if backoff is not None else Backoff()
        self._table = MemberTable()
        self._endpoints = endpoints
        self._on_view = on_view
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._endpoint: str | None = None
        self._last_message = 0.0
        self._keepalive_s = _DEFAULT_KEEPALIVE_S
        self._thread: threading.Thread | None = None
        self._refusals_logged = LogThrottle()

    def adopt(self, epoch: int, members: list[Member]) -> None:
        """Merge a view got elsewhere (the first one, from ``fetch_view``) and hand on the table."""
        self._table.merge(members)
        self._on_view(epoch, self._table.members())

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
            endpoints = self._endpoints(failed)
            if not endpoints and self._stop.wait(self._backoff.next()):
                return
            for endpoint in endpoints:
                if self._stop.is_set():
                    return
                healthy = self._stream(endpoint)
                failed = endpoint
                if healthy:
                    self._backoff.reset()
                # Every re-watch waits a jittered back-off, even after a healthy stream: the
                # watchers of a member that left must not all land on the next one together.
                if self._stop.wait(self._backoff.next()):
                    return
                if healthy:
                    break  # the view may have changed: recompute whom to try next

    def _stream(self, endpoint: str) -> bool:
        """Follow one member's stream until it ends; True if it was healthy (delivered messages
        for at least one keepalive period)."""
        spoke = False
        request = cluster_pb2.WatchRequest(nonce=fresh_nonce())
        try:
            call = cluster_pb2_grpc.ClusterStub(self._pool.get(endpoint)).Watch(request)
        except (RuntimeError, ValueError) as exc:  # pool closed, or an endpoint gRPC rejects
            log.debug("cannot watch %s: %s", endpoint, exc)
            return False
        with self._lock:
            if self._stop.is_set():
                call.cancel()
                return False
            self._call, self._endpoint, self._last_message = call, endpoint, time.monotonic()
        opened = time.monotonic()
        try:
            for index, reply in enumerate(call):
                try:
                    self._pool.check_reply(WATCH, request, reply, index)
                    if reply.keepalive_ms and not MIN_KEEPALIVE_MS <= reply.keepalive_ms <= MAX_KEEPALIVE_MS:
                        raise ValueError(
                            f"keepalive_ms {reply.keepalive_ms} out of range {MIN_KEEPALIVE_MS}-{MAX_KEEPALIVE_MS}"
                        )
                    self._cluster.check(reply.header.cluster_id, endpoint)
                except ValueError as exc:  # ReplyRefused and WrongCluster too: nothing from this stream is used
                    if self._refusals_logged.allow(endpoint):
                        log.warning("dropping the view stream from %s: %s", endpoint, exc)
                    call.cancel()
                    return False
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
                    self._table.merge(members)
                    self._on_view(epoch, self._table.members())
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                log.debug("view stream from %s ended: %s", endpoint, describe_rpc_error(exc))
        finally:
            with self._lock:
                self._call = self._endpoint = None
                lasted = time.monotonic() - opened >= self._keepalive_s
        return spoke and lasted
