"""The gRPC servicers: Cluster (membership), Maintenance (statistics), Session (set-up).

They translate between protobuf and the membership state; every record from the wire is
validated first (INVALID_ARGUMENT on anything malformed, integers out of range included), and
nothing is changed before that. Callers' proofs are checked, and answers signed, by the
interceptor in ``decoding`` before and after these run. Handlers are ``async def`` (they run
on the control plane's event loop and must not block); a handler that may block stays a plain
``def`` and the interceptor runs it in a small executor (``MaintenanceService``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from lmcache_memkv.control import auth
from lmcache_memkv.control.changes import ViewChanges
from lmcache_memkv.control.channel import describe_rpc_error
from lmcache_memkv.control.convert import (
    check_figure,
    check_incarnation,
    member_from_proto,
    member_to_proto,
    state_to_proto,
    view_from_proto,
    view_to_proto,
)
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership
from lmcache_memkv.control.peers import Peers
from lmcache_memkv.control.response_auth import STATUS
from lmcache_memkv.control.stats import total
from lmcache_memkv.control.swim import MAX_GOSSIP_IN, MAX_PIGGYBACK, Count, Swim
from lmcache_memkv.proto.memkv.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    maintenance_pb2,
    maintenance_pb2_grpc,
    member_pb2,
    session_pb2,
    session_pb2_grpc,
)
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, VERSION

log = logging.getLogger("memkv.control")
_MAX_NONCE = 64
_MAX_PING_REQ_S = 10.0  # a PingReq holds a thread of its own while it waits: never longer than this
_MAX_PING_REQS = 8  # ... and at most this many do at once (answered "no ack" beyond)
_Reply = TypeVar("_Reply", bound=Message)


def _header(membership: Membership, cluster_id: str = "") -> member_pb2.ResponseHeader:
    return member_pb2.ResponseHeader(node_id=membership.node_id, epoch=membership.epoch, cluster_id=cluster_id)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _invalid(context: grpc.ServicerContext, message: str) -> NoReturn:
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)


def _taken(membership: Membership, node_id: str) -> str:
    return (
        f"node id {node_id!r} is already taken by the node at {membership.local.control_endpoint}; "
        "give every node its own --node-id"
    )


# The same for ``async def`` handlers, which run on the loop (``context.abort`` is a coroutine there).


async def _abort_async(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


async def _invalid_async(context: Any, message: str) -> NoReturn:
    await _abort_async(context, grpc.StatusCode.INVALID_ARGUMENT, message)


async def _own_record_async(membership: Membership, p: member_pb2.Member, context: Any, rpc: str) -> Member:
    """The caller's record of itself, validated; a caller claiming this node's id is refused."""
    try:
        record = member_from_proto(p)
    except ValueError as exc:
        await _invalid_async(context, f"{rpc}: {exc}")
    if record.node_id == membership.node_id:
        await _abort_async(context, grpc.StatusCode.FAILED_PRECONDITION, _taken(membership, record.node_id))
    return record


async def _same_cluster(membership: Membership, cluster_id: str, context: Any, rpc: str) -> None:
    """Refuse a caller of another cluster. An empty id (a tool or an older caller that does not
    say) is taken as this cluster's: the auth key, not this check, keeps strangers out."""
    if cluster_id and cluster_id != membership.cluster_id:
        await _abort_async(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{rpc}: the caller belongs to cluster {cluster_id!r}, this node ({membership.node_id}) to "
            f"{membership.cluster_id!r}; check --cluster-id and --seed",
        )


async def _records(context: Any, rpc: str, protos: Sequence[member_pb2.Member]) -> list[Member]:
    if len(protos) > MAX_GOSSIP_IN:
        await _invalid_async(context, f"{rpc}: {len(protos)} gossip records, more than {MAX_GOSSIP_IN}")
    try:
        return [member_from_proto(p) for p in protos]
    except ValueError as exc:
        await _invalid_async(context, f"{rpc}: {exc}")


async def _merge_async(context: Any, rpc: str, apply: Callable[[], bool]) -> bool:
    """Run a membership update; its range checks refuse with INVALID_ARGUMENT (nothing changed)."""
    try:
        return apply()
    except ValueError as exc:
        await _invalid_async(context, f"{rpc}: {exc}")


def _checked_stats(stats: maintenance_pb2.NodeStats) -> maintenance_pb2.NodeStats:
    """A peer's statistics, every counter in range (they are summed into the cluster total)."""
    for field, value in stats.ListFields():
        if isinstance(value, int):
            check_figure(value, f"stats {field.name}")
    return stats


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """Runs on the control plane's event loop: every handler is quick (membership updates under
    a short lock), and a watch is a coroutine parked on ``changes``, not a thread."""

    def __init__(
        self,
        membership: Membership,
        keepalive_s: float,
        changes: ViewChanges,
        max_watchers: int,
        cluster_id: str = "",
        swim: Swim | None = None,
        count: Count = lambda direction, n: None,
    ) -> None:
        self._m = membership
        self._keepalive_s = keepalive_s
        self._changes = changes
        self._max_watchers = max_watchers
        self._watchers = 0  # touched on the loop only
        self._cluster_id = cluster_id
        self._swim = swim
        self._count = count
        # A PingReq waits on a (sync) ping: it gets a thread of its own, a few at once, so it
        # never holds the loop or the executors that Ping and the other calls use.
        self._ping_reqs = 0  # touched on the loop only
        self._ping_req_pool = ThreadPoolExecutor(max_workers=_MAX_PING_REQS, thread_name_prefix="memkv-pingreq")

    def _header(self) -> member_pb2.ResponseHeader:
        return _header(self._m, self._cluster_id)

    def _sent(self, reply: _Reply) -> _Reply:
        self._count("sent", reply.ByteSize())
        return reply

    def close(self) -> None:
        self._ping_req_pool.shutdown(wait=False, cancel_futures=True)

    def _view(self) -> member_pb2.View:
        return view_to_proto(*self._m.view())

    @property
    def watchers(self) -> int:
        return self._watchers

    async def MemberList(self, request: cluster_pb2.MemberListRequest, context: Any) -> cluster_pb2.MemberListResponse:
        return cluster_pb2.MemberListResponse(header=self._header(), view=self._view())

    async def Join(self, request: cluster_pb2.JoinRequest, context: Any) -> cluster_pb2.JoinResponse:
        self._count("received", request.ByteSize())
        await _same_cluster(self._m, request.cluster_id, context, "Join")
        record = await _own_record_async(self._m, request.member, context, "Join")
        if record.state is not State.ALIVE:
            await _invalid_async(context, f"Join: a joining member must be ALIVE, got {record.state}")
        if await _merge_async(context, "Join", lambda: self._m.heard_from(record)):
            log.info(
                "member %s joined (incarnation %d, control %s)",
                record.node_id,
                record.incarnation,
                record.control_endpoint,
            )
        return self._sent(cluster_pb2.JoinResponse(header=self._header(), view=self._view()))

    async def Leave(self, request: cluster_pb2.LeaveRequest, context: Any) -> cluster_pb2.LeaveResponse:
        self._count("received", request.ByteSize())
        if request.node_id == self._m.node_id:
            await _invalid_async(context, "Leave: a node leaves by stopping, not by being told to")
        known = self._m.get(request.node_id)
        if known is None:
            await _abort_async(context, grpc.StatusCode.NOT_FOUND, f"Leave: no member {request.node_id!r}")
        try:
            check_incarnation(request.incarnation, f"Leave {request.node_id}")
        except ValueError as exc:
            await _invalid_async(context, f"Leave: {exc}")
        if request.incarnation >= known.incarnation:  # an earlier life's goodbye must not remove a restart
            left = Member(
                node_id=known.node_id,
                incarnation=request.incarnation,
                state=State.LEFT,
                data_endpoint=known.data_endpoint,
                control_endpoint=known.control_endpoint,
                transports=known.transports,
            )
            if await _merge_async(context, "Leave", lambda: self._m.heard_from(left)):
                log.info("member %s left", request.node_id)
        return self._sent(cluster_pb2.LeaveResponse(header=self._header(), view=self._view()))

    async def Heartbeat(self, request: cluster_pb2.HeartbeatRequest, context: Any) -> cluster_pb2.HeartbeatResponse:
        """Anti-entropy: a full-view exchange, now and then (see ``swim``)."""
        self._count("received", request.ByteSize())
        await _same_cluster(self._m, request.cluster_id, context, "Heartbeat")
        record = await _own_record_async(self._m, request.member, context, "Heartbeat")
        try:
            epoch, members = view_from_proto(request.view)
        except ValueError as exc:
            await _invalid_async(context, f"Heartbeat: {exc}")
        await _merge_async(context, "Heartbeat", lambda: self._m.heard_from(record))
        await _merge_async(context, "Heartbeat", lambda: self._m.merge(epoch, members, source=record.node_id))
        return self._sent(
            cluster_pb2.HeartbeatResponse(header=self._header(), member=member_to_proto(self._m.local), view=self._view())
        )

    async def Ping(self, request: cluster_pb2.PingRequest, context: Any) -> cluster_pb2.PingResponse:
        """SWIM's ack: our record, the caller's as we hold it (its echo), a few recent changes."""
        self._count("received", request.ByteSize())
        await _same_cluster(self._m, request.cluster_id, context, "Ping")
        record = await _own_record_async(self._m, request.member, context, "Ping")
        gossip = await _records(context, "Ping", request.gossip)
        if request.HasField("target"):
            gossip += await _records(context, "Ping", [request.target])  # us as the caller holds us: its echo
        await _merge_async(context, "Ping", lambda: self._m.heard_from(record))
        await _merge_async(
            context,
            "Ping",
            lambda: self._m.absorb(gossip, source=record.node_id, epoch=request.epoch, digest=request.view_digest),
        )
        reply = cluster_pb2.PingResponse(
            header=self._header(),
            member=member_to_proto(self._m.local),
            gossip=[member_to_proto(r) for r in self._m.piggyback(MAX_PIGGYBACK)],
            view_digest=self._m.digest()[1],
        )
        seen = self._m.get(record.node_id)
        if seen is not None:
            reply.seen.CopyFrom(member_to_proto(seen))
        origin = self._m.get(request.origin) if request.origin else None
        if origin is not None:
            reply.seen_origin.CopyFrom(member_to_proto(origin))
        return self._sent(reply)

    async def PingReq(self, request: cluster_pb2.PingReqRequest, context: Any) -> cluster_pb2.PingReqResponse:
        """Probe ``target`` for the caller, which got no direct ack; relay the ack if one comes."""
        self._count("received", request.ByteSize())
        await _same_cluster(self._m, request.cluster_id, context, "PingReq")
        record = await _own_record_async(self._m, request.member, context, "PingReq")
        gossip = await _records(context, "PingReq", request.gossip)
        if not request.HasField("target"):
            await _invalid_async(context, "PingReq: no target")
        target = (await _records(context, "PingReq", [request.target]))[0]
        await _merge_async(context, "PingReq", lambda: self._m.heard_from(record))
        await _merge_async(context, "PingReq", lambda: self._m.absorb(gossip, source=record.node_id))
        reply = cluster_pb2.PingReqResponse(header=self._header(), member=member_to_proto(self._m.local))
        if target.node_id == self._m.node_id:  # the caller asks us about us: we are the ack
            reply.acked = True
            reply.target.CopyFrom(member_to_proto(self._m.local))
            seen = self._m.get(record.node_id)
            if seen is not None:
                reply.seen.CopyFrom(member_to_proto(seen))
        elif self._swim is not None and self._ping_reqs < _MAX_PING_REQS:
            self._ping_reqs += 1
            try:
                remaining = context.time_remaining()
                wait = min(request.timeout_ms / 1000, _MAX_PING_REQ_S)
                if remaining is not None:
                    wait = min(wait, remaining * 0.9)
                ack = None
                if wait > 0:
                    loop = asyncio.get_running_loop()
                    ack = await loop.run_in_executor(self._ping_req_pool, self._swim.ping_for, target, record.node_id, wait)
            finally:
                self._ping_reqs -= 1
            if ack is not None:
                reply.acked = True
                reply.target.CopyFrom(ack.member)
                if ack.HasField("seen_origin"):
                    reply.seen.CopyFrom(ack.seen_origin)
        reply.gossip.extend(member_to_proto(r) for r in self._m.piggyback(MAX_PIGGYBACK))
        return self._sent(reply)

    async def Watch(self, request: cluster_pb2.WatchRequest, context: Any) -> AsyncIterator[cluster_pb2.WatchResponse]:
        # A stream costs a coroutine and gRPC's per-stream buffers, not a thread; the cap only
        # bounds that memory (``--max-watchers``).
        if self._watchers >= self._max_watchers:
            await _abort_async(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node serves at most {self._max_watchers} watchers (--max-watchers); watch another member",
            )
        self._watchers += 1
        keepalive_ms = int(self._keepalive_s * 1000)
        try:
            sent = request.start_epoch
            while not self._m.closed:
                epoch, members = self._m.view()
                if epoch != sent or sent == 0:
                    yield cluster_pb2.WatchResponse(
                        header=self._header(), view=view_to_proto(epoch, members), keepalive_ms=keepalive_ms
                    )
                    sent = epoch
                else:
                    yield cluster_pb2.WatchResponse(header=self._header(), keepalive_ms=keepalive_ms)
                await self._changes.wait(epoch, self._keepalive_s)
        finally:
            self._watchers -= 1


class MaintenanceService(maintenance_pb2_grpc.MaintenanceServicer):
    """Both handlers stay sync on purpose: they read the data plane's statistics and fan out to
    peers with blocking waits, so the interceptor runs them in the control plane's executor for
    slow calls, never on the loop that serves heartbeats and watches."""

    def __init__(
        self,
        membership: Membership,
        status: Callable[[], maintenance_pb2.StatusResponse],
        peers: Peers,
        cluster_id: str = "",
    ) -> None:
        self._m = membership
        self._status = status
        self._peers = peers
        self._cluster_id = cluster_id

    def Status(
        self, request: maintenance_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> maintenance_pb2.StatusResponse:
        return self._status()

    def ClusterStats(
        self, request: maintenance_pb2.ClusterStatsRequest, context: grpc.ServicerContext
    ) -> maintenance_pb2.ClusterStatsResponse:
        remaining = context.time_remaining()
        timeout = min(2.0, max(0.1, remaining - 0.1)) if remaining is not None else 2.0
        own = self._status()
        nodes: list[maintenance_pb2.NodeStatus] = []
        asked = []
        for m in self._m.peers():
            if m.state in (State.ALIVE, State.SUSPECT):
                asked.append((m, *self._peers.status(m.control_endpoint, timeout)))
            else:
                nodes.append(
                    maintenance_pb2.NodeStatus(
                        node_id=m.node_id, state=state_to_proto(m.state), error=f"member is {m.state}"
                    )
                )
        nodes.append(maintenance_pb2.NodeStatus(node_id=self._m.node_id, state=own.member.state, stats=own.stats))
        for m, request, future in asked:
            try:
                reply = future.result()
                self._peers.check_reply(STATUS, request, reply)
                stats = _checked_stats(reply.stats)
                nodes.append(maintenance_pb2.NodeStatus(node_id=m.node_id, state=state_to_proto(m.state), stats=stats))
            except (grpc.RpcError, ValueError) as exc:  # ReplyRefused, or a figure out of range
                detail = describe_rpc_error(exc) if isinstance(exc, grpc.RpcError) else str(exc)
                nodes.append(maintenance_pb2.NodeStatus(node_id=m.node_id, state=state_to_proto(m.state), error=detail))
        nodes.sort(key=lambda n: n.node_id)
        up = sum(n.state == member_pb2.MEMBER_STATE_ALIVE for n in nodes)
        return maintenance_pb2.ClusterStatsResponse(
            header=_header(self._m, self._cluster_id),
            nodes=nodes,
            total=total(n.stats for n in nodes if n.HasField("stats")),
            members_up=up,
            members_down=len(nodes) - up,
        )


class SessionService(session_pb2_grpc.SessionServicer):
    """Transport negotiation; for "rdma" also the queue-pair exchange (``rdma``: the node's
    sessions, None without a verbs device). The caller proved the key in its call metadata (the
    interceptor checked it) and the answer proves it back, over the client's nonce."""

    def __init__(self, membership: Membership, key: bytes | None, cluster_id: str = "", rdma: Any = None) -> None:
        self._m = membership
        self._key = key
        self._cluster_id = cluster_id
        self._rdma = rdma

    async def Hello(self, request: session_pb2.HelloRequest, context: Any) -> session_pb2.HelloResponse:
        if request.protocol_version != VERSION:
            await _abort_async(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client speaks memkv protocol v{request.protocol_version}, this node speaks v{VERSION}",
            )
        if len(request.client_nonce) > _MAX_NONCE:
            await _invalid_async(context, f"Hello: client_nonce over {_MAX_NONCE} bytes")
        me = self._m.local
        offered = list(request.transports) or ["tcp"]
        chosen = next((t for t in offered if t in me.transports), None)
        if chosen is None:
            await _abort_async(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no common transport: client offers {offered}, node {me.node_id} has {list(me.transports)}",
            )
        proof = auth.session_proof(self._key, request.client_nonce) if self._key is not None else b""
        reply = session_pb2.HelloResponse(
            header=_header(self._m, self._cluster_id),
            protocol_version=VERSION,
            transport=chosen,
            data_endpoint=me.data_endpoint,
            server_proof=proof,
        )
        if chosen == "rdma":
            await self._rdma_session(request, reply, context)
        return reply

    async def _rdma_session(self, request: session_pb2.HelloRequest, reply: session_pb2.HelloResponse, context: Any) -> None:
        from lmcache_memkv.transport.rdma import QpInfo, RdmaError, Region, SessionsExhausted

        if self._rdma is None:
            await _abort_async(context, grpc.StatusCode.FAILED_PRECONDITION, "this node has no RDMA device")
        try:
            client_id = bytes.fromhex(request.client_id)
        except ValueError:
            client_id = b""
        if len(client_id) != CLIENT_ID_LEN:
            await _invalid_async(context, f"Hello: client_id must be {CLIENT_ID_LEN} bytes in hex")
        if not request.HasField("rdma_endpoint") or len(request.memory_regions) != 1:
            await _invalid_async(context, "Hello: transport rdma needs the client's queue pair and exactly one memory region")
        ep, mr = request.rdma_endpoint, request.memory_regions[0]
        peer = QpInfo(qp_num=ep.qp_num, gid=bytes(ep.gid), psn=ep.psn, mtu=ep.mtu, lid=ep.lid, gid_index=ep.gid_index)
        try:
            peer.check()
            region = Region(addr=mr.addr, length=mr.length, lkey=0, rkey=mr.rkey)
            # create_qp and the modify_qp calls are blocking verbs (slow on soft-RoCE): off the
            # control plane's event loop, which also answers the SWIM probes.
            token, mine = await asyncio.to_thread(self._rdma.open, client_id, peer, region)
        except ValueError as exc:
            await _invalid_async(context, f"Hello: {exc}")
        except RdmaError as exc:
            # A full session table is a "later", not a broken device: the client backs off.
            full = isinstance(exc, SessionsExhausted)
            await _abort_async(context, grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE, str(exc))
        reply.session_id = token
        reply.rdma_endpoint.CopyFrom(
            session_pb2.RdmaEndpoint(
                lid=mine.lid, gid=mine.gid, qp_num=mine.qp_num, psn=mine.psn, mtu=mine.mtu, gid_index=mine.gid_index
            )
        )
