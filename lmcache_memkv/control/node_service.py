"""A node's control plane: the gRPC server, joining through seeds, the SWIM protocol loop,
graceful leave.

Every protocol period (the heartbeat interval) the node applies suspicion timeouts and
reaping, then runs one SWIM period (``swim``: one probe, piggybacked gossip). Every few
periods it re-joins the seeds it does not know as ALIVE and one random DEAD member not yet
reaped, so a partition heals and a reaped node comes back.

The gRPC server is grpc.aio on one event loop of its own (``LoopThread``): membership calls and
watches run on it as coroutines (a watcher costs no thread), and handlers that may block
(statistics, the ClusterStats fan-out) run in a small executor beside it, so a heartbeat never
queues behind them. Outgoing calls to peers (probes, joins, leaves) stay on the sync gRPC
stack, driven by the protocol thread.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lmcache_memkv import __version__
from lmcache_memkv.control.auth import NodeNames, ProofChecker
from lmcache_memkv.control.changes import ViewChanges
from lmcache_memkv.control.channel import MAX_MESSAGE, ChannelPool, describe_rpc_error
from lmcache_memkv.control.convert import member_to_proto, view_from_proto
from lmcache_memkv.control.decoding import StrictDecoding
from lmcache_memkv.control.loop_thread import LoopThread
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership
from lmcache_memkv.control.peers import LogThrottle, Peers, wait_all
from lmcache_memkv.control.response_auth import CLUSTER_STATS, JOIN, STATUS, fresh_nonce
from lmcache_memkv.control.service import ClusterService, MaintenanceService, SessionService
from lmcache_memkv.control.stats import RateMeter, node_stats
from lmcache_memkv.control.swim import Swim
from lmcache_memkv.control.tls import ca_from_env, server_credentials
from lmcache_memkv.endpoints import format_endpoint, parse_endpoint
from lmcache_memkv.node.config import NodeConfig
from lmcache_memkv.node.server import NodeServer
from lmcache_memkv.proto.memkv.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    maintenance_pb2,
    maintenance_pb2_grpc,
    member_pb2,
    session_pb2,
    session_pb2_grpc,
)
from lmcache_memkv.wire.constants import VERSION

log = logging.getLogger("memkv.control")
# Handlers that may block (statistics, the ClusterStats fan-out to peers) run a few at a time,
# which is plenty for operators' tools, and never share a thread with membership calls.
_SLOW_METHODS = frozenset({STATUS, CLUSTER_STATS})
_SLOW_WORKERS = 4
# Any other handler a servicer leaves sync (quick ones, by contract) runs in its own executor.
_SYNC_WORKERS = 4
_LOOP_CALL_S = 10.0  # bound on one hand-over to the loop (it only sets up or tears down)
_REJOIN_EVERY = 5  # protocol periods between re-joins of the seeds not known ALIVE
_LEAVE_WAIT_S = 1.0
_METHODS = frozenset(
    f"/{service.full_name}/{m.name}"
    for module in (cluster_pb2, maintenance_pb2, session_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for m in service.methods
) | {"/grpc.health.v1.Health/Watch"}
_TAKEN = "is already taken"  # the seed's refusal of a joiner whose --node-id it holds itself (service._own_record)
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)


def _advertised(host: str, port: int, advertise_host: str | None = None) -> str:
    """An endpoint peers and clients can dial: ``--advertise-host`` if given, else the bound
    address, and a wildcard bind under this host's name."""
    if advertise_host:
        host = advertise_host
    elif host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return format_endpoint(host, port)


def _ops_total(server: NodeServer) -> int:
    return int(
        sum(s.value for metric in server.metrics.ops.collect() for s in metric.samples if s.name.endswith("_total"))
    )


class ControlPlane:
    def __init__(self, server: NodeServer, config: NodeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._server = server
        self._config = config
        # Nodes dial each other too: with TLS and no MEMKV_TLS_CA they trust their own certificate.
        tls_ca = ca_from_env() or config.tls_cert
        self._peers = Peers(ChannelPool(config.auth_key, tls_ca if config.tls_cert else None))
        self._rate = RateMeter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()
        # Refusals are logged once per peer per minute: what a peer sends must not grow the log or memory.
        self._refusals_logged = LogThrottle()
        self._auth_refusals_logged = LogThrottle()
        # The names proofs may target are known once bound (below); no call arrives before start().
        self._checker = ProofChecker(config.auth_key, NodeNames(config.node_id))
        self._id_clash: str | None = None  # set by a seed refusing our --node-id: start() fails
        # The cluster id in every answer's header (NodeConfig.cluster_id arrives with the SWIM
        # work; until then a node names no cluster).
        self._cluster_id = config.cluster_id
        self._rng = random.Random()
        # Threads start on first use: a node nobody asks for statistics never has them.
        self._slow = ThreadPoolExecutor(max_workers=_SLOW_WORKERS, thread_name_prefix="memkv-control-slow")
        self._sync = ThreadPoolExecutor(max_workers=_SYNC_WORKERS, thread_name_prefix="memkv-control-sync")
        self._loop = LoopThread("memkv-control-loop")
        try:
            self._build(server, config, clock)
        except BaseException:
            self._loop.close()
            self._slow.shutdown(wait=False)
            self._sync.shutdown(wait=False)
            raise

    def _build(self, server: NodeServer, config: NodeConfig, clock: Callable[[], float]) -> None:
        # Standard grpc.health.v1, for load balancers and Kubernetes gRPC probes: NOT_SERVING
        # until joined, and again from SIGTERM on (draining).
        self.health = health_aio.HealthServicer()
        self._loop.run(self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING), _LOOP_CALL_S)
        interceptor = StrictDecoding(self._checker, self._auth_failed, self._sync, self._slow, _SLOW_METHODS)
        self._grpc = self._loop.run(self._new_server(interceptor), _LOOP_CALL_S)
        listen = config.control_listen or "127.0.0.1:0"
        host, _ = parse_endpoint(listen, field="--control-listen")
        try:
            port = self._loop.run(self._bind(listen), _LOOP_CALL_S)
        except RuntimeError as exc:
            raise OSError(f"--control-listen {listen}: cannot bind: {exc}") from None
        if not port:
            raise OSError(f"--control-listen {listen}: cannot bind")
        self.endpoint = format_endpoint(host, port)
        data_host, data_port = server.address
        stats = server.stats()
        started_ms = time.time_ns() // 1_000_000
        local = Member(
            node_id=config.node_id,
            # Start time in ms: a restart outranks every record of the previous life.
            incarnation=started_ms,
            data_since=started_ms,  # the arena starts empty
            state=State.ALIVE,
            data_endpoint=_advertised(data_host, data_port, config.advertise_host),
            control_endpoint=_advertised(host, port, config.advertise_host),
            transports=("rdma", "tcp") if server.rdma is not None else ("tcp",),
            capacity_bytes=stats["capacity_bytes"],
            used_bytes=stats["used_bytes"],
        )
        self._checker.names = NodeNames(config.node_id, listen, port, local.control_endpoint)
        self.membership = Membership(
            local,
            suspect_after_s=config.suspect_after_s,
            dead_after_s=config.dead_after_s,
            clock=clock,
            stall_after_s=config.suspect_after_s,  # ticks run every heartbeat interval, well below this
            reap_after_s=config.reap_after_s,
            cluster_id=config.cluster_id,
        )
        self.membership.on_declared_dead = lambda: server.fence.fence("the cluster declared this node DEAD")
        server.fence.on_stall_wipe = self.membership.data_restarted
        server.write_gate = self.membership.writable
        gossip_bytes = server.metrics.gossip_bytes
        self._count = lambda direction, n: gossip_bytes.labels(config.node_id, direction).inc(n)
        self.swim = Swim(
            self.membership,
            self._peers,
            interval_s=config.heartbeat_interval_s,
            probe_timeout_s=config.suspect_after_s,
            indirect_probes=config.indirect_probes,
            count=self._count,
            outcome=lambda result: server.metrics.swim_probes.labels(config.node_id, result).inc(),
        )
        keepalive_s = max(1.0, config.heartbeat_interval_s)
        changes = ViewChanges(self.membership, self._loop.loop)
        self._cluster = ClusterService(
            self.membership, keepalive_s, changes, config.max_watchers, self._cluster_id, self.swim, self._count
        )
        maintenance = MaintenanceService(self.membership, self.status, self._peers, self._cluster_id)
        session = SessionService(self.membership, config.auth_key, self._cluster_id, rdma=server.rdma)
        self._loop.run(self._register(maintenance, session), _LOOP_CALL_S)

    async def _new_server(self, interceptor: StrictDecoding) -> grpc.aio.Server:
        return grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.so_reuseport", 0),  # a second node on the same port must fail, not share it
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )

    async def _bind(self, listen: str) -> int:
        cert, key = self._config.tls_cert, self._config.tls_key
        if cert and key:
            return int(self._grpc.add_secure_port(listen, server_credentials(cert, key)))
        return int(self._grpc.add_insecure_port(listen))

    async def _register(self, maintenance: MaintenanceService, session: SessionService) -> None:
        cluster_pb2_grpc.add_ClusterServicer_to_server(self._cluster, self._grpc)
        maintenance_pb2_grpc.add_MaintenanceServicer_to_server(maintenance, self._grpc)
        session_pb2_grpc.add_SessionServicer_to_server(session, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)

    @property
    def watchers(self) -> int:
        """Watch streams open now."""
        return self._cluster.watchers

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop.run(self._grpc.start(), _LOOP_CALL_S)
        log.info("node %s serving control on %s", self._config.node_id, self.endpoint)
        self._join_seeds(timeout_s=min(2.0, self._config.dead_after_s), wait=True)
        if self._id_clash is not None:
            self._shutdown(0)
            raise RuntimeError(self._id_clash)
        self._loop.run(self.health.set("", health_pb2.HealthCheckResponse.SERVING), _LOOP_CALL_S)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="memkv-heartbeat", daemon=True)
        self._thread.start()

    def draining(self) -> None:
        """From now on health checks answer NOT_SERVING (SIGTERM: the node is going away)."""
        if self._loop.running:
            self._loop.run(self.health.enter_graceful_shutdown(), _LOOP_CALL_S)

    def stop(self, grace_s: float = 0.5) -> None:
        """Leave gracefully: peers see LEFT at once instead of finding this node DEAD later."""
        self.leave()
        self.close(grace_s)

    def leave(self) -> None:
        """Tell the peers this node is LEFT and stop heartbeating; the gRPC server (health) still answers."""
        self.draining()
        me = self.membership.leave()
        request = cluster_pb2.LeaveRequest(node_id=me.node_id, incarnation=me.incarnation, nonce=fresh_nonce())
        told = [
            self._peers.leave(m.control_endpoint, request, _LEAVE_WAIT_S)
            for m in self.membership.peers()
            if m.state in (State.ALIVE, State.SUSPECT)
        ]
        wait_all(told, _LEAVE_WAIT_S + 0.5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.membership.close()  # every watch stream ends (after sending the LEFT view)

    def close(self, grace_s: float = 0.5) -> None:
        """Stop the gRPC server (after ``leave``)."""
        self._shutdown(grace_s)

    def _shutdown(self, grace_s: float) -> None:
        if self._loop.running:
            try:
                self._loop.run(self._grpc.stop(grace_s), grace_s + _LOOP_CALL_S)
            finally:
                self._loop.close()
        self._cluster.close()
        self._slow.shutdown(wait=True, cancel_futures=True)
        self._sync.shutdown(wait=True, cancel_futures=True)
        self._peers.close()

    # ------------------------------------------------------------------ statistics

    def status(self) -> maintenance_pb2.StatusResponse:
        stats = self._server.stats()
        ops = _ops_total(self._server)
        self.membership.set_usage(stats["capacity_bytes"], stats["used_bytes"])
        return maintenance_pb2.StatusResponse(
            header=member_pb2.ResponseHeader(
                node_id=self.membership.node_id, epoch=self.membership.epoch, cluster_id=self._cluster_id
            ),
            member=member_to_proto(self.membership.local),
            stats=node_stats(stats, ops, self._rate.sample(ops)),
            version=__version__,
            uptime_seconds=time.time() - self._started_at,
            protocol_version=VERSION,
        )

    # ------------------------------------------------------------------ membership traffic

    def _auth_failed(self, method: str, reason: str, peer: str) -> None:
        # Only this project's methods and "unknown" get a label: a prober must not grow the metric.
        label = method if method in _METHODS else "unknown"
        self._server.metrics.control_auth_failures.labels(self._config.node_id, label).inc()
        host = peer.rpartition(":")[0] or peer  # per host: a caller's port changes with each connection
        if self._auth_refusals_logged.allow(host):
            log.warning(
                "refused control call %s from %s: %s (not logged again for this host for a minute)",
                method,
                peer,
                reason,
            )

    def _join_seeds(self, timeout_s: float, wait: bool, also: Sequence[str] = ()) -> None:
        """Announce this node to every seed not yet known as ALIVE (and to ``also``); optionally
        wait for the answers."""
        me = self.membership.local
        known = {m.control_endpoint for m in self.membership.peers() if m.state is State.ALIVE}
        seeds = [s for s in self._config.seeds if s not in known and s not in (self.endpoint, me.control_endpoint)]
        seeds += [s for s in also if s not in seeds]
        sent = []
        for seed in seeds:
            request = cluster_pb2.JoinRequest(
                member=member_to_proto(me), nonce=fresh_nonce(), cluster_id=self.membership.cluster_id
            )
            self._count("sent", request.ByteSize())
            future = self._peers.join(seed, request, timeout_s)
            future.add_done_callback(partial(self._on_join_reply, seed, request))
            sent.append(future)
        if not wait or not sent:
            return
        if not any(f.exception() is None for f in wait_all(sent, timeout_s + 0.5)) and self._id_clash is None:
            log.warning("no seed answered (%s); serving alone until one does", ", ".join(seeds))

    def _on_join_reply(self, seed: str, request: cluster_pb2.JoinRequest, future: grpc.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.FAILED_PRECONDITION and _TAKEN in (exc.details() or ""):
                self._id_clash = f"seed {seed} refused to let this node join: {exc.details()}"
                if self._refusals_logged.allow(seed):
                    log.error("--node-id %s clashes: %s", self._config.node_id, exc.details())
            elif isinstance(exc, grpc.Call) and exc.code() in _REFUSALS and self._refusals_logged.allow(seed):
                log.error("seed %s refused our join: %s", seed, describe_rpc_error(exc))
            else:
                log.debug("seed did not answer: %s", describe_rpc_error(exc))
            return
        reply: cluster_pb2.JoinResponse = future.result()
        self._count("received", reply.ByteSize())
        try:
            self._peers.check_reply(JOIN, request, reply)  # a seed without our key must not shape our view
            if reply.header.cluster_id != self.membership.cluster_id:
                raise ValueError(
                    f"it belongs to cluster {reply.header.cluster_id!r}, this node to {self.membership.cluster_id!r}"
                )
            epoch, members = view_from_proto(reply.view)
            for m in members:  # the seed's own record in its view: we just heard from it
                if m.node_id == reply.header.node_id:
                    self.membership.heard_from(m)
            # The seed's view is news to us only: the others have it, so it is not re-gossiped.
            self.membership.merge(epoch, members, source=reply.header.node_id, spread=False)
        except ValueError as exc:  # ReplyRefused, a malformed view, an integer out of range
            if self._refusals_logged.allow(seed):
                log.warning("ignoring the answer of seed %s: %s", seed, exc)

    def _heartbeat_loop(self) -> None:
        interval = self._config.heartbeat_interval_s
        rounds = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._round(rounds)
            except Exception:  # a bad round must not end failure detection for good
                log.exception("protocol period failed")
            rounds += 1
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _round(self, rounds: int) -> None:
        # First: after a stall this drops the data before anything is served or gossiped.
        self._server.fence.beat(any(m.state in (State.ALIVE, State.SUSPECT) for m in self.membership.peers()))
        for node_id, state in self.membership.tick():
            if state is None:
                log.info("member %s reaped: DEAD or LEFT for over %.0fs", node_id, self._config.reap_after_s)
            else:
                log.warning("member %s is now %s (its suspicion was not refuted)", node_id, state)
        stats = self._server.stats()
        self.membership.set_usage(stats["capacity_bytes"], stats["used_bytes"])
        self._rate.sample(_ops_total(self._server))
        self.swim.round()
        if rounds and rounds % _REJOIN_EVERY == 0:
            # Also one DEAD member not yet reaped, at random: if it was only cut off (a partition),
            # the answer brings both sides together again, whatever the seeds are.
            dead = [m.control_endpoint for m in self.membership.peers() if m.state is State.DEAD]
            also = [self._rng.choice(dead)] if dead else []
            self._join_seeds(timeout_s=self._config.suspect_after_s, wait=False, also=also)


def start_control_plane(server: NodeServer, config: NodeConfig) -> ControlPlane:
    """Bind, join the seeds (bounded wait) and start heartbeating; ``.endpoint`` is the bound address."""
    plane = ControlPlane(server, config)
    plane.start()
    return plane
