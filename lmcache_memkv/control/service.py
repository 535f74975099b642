"""The gRPC servicers: Cluster (membership), Maintenance (statistics), Session (set-up).

They translate between protobuf and the membership state; every record from the wire is
validated first (INVALID_ARGUMENT on anything malformed, integers out of range included), and
nothing is changed before that. Callers' proofs are checked, and answers signed, by the
interceptor in ``decoding`` before and after these run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from lmcache_memkv.control import auth
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
from lmcache_memkv.wire.constants import VERSION

log = logging.getLogger("memkv.control")
_MAX_NONCE = 64
_MAX_PING_REQ_S = 10.0  # a PingReq holds a server thread while it waits: never longer than this
_MAX_PING_REQS = 8  # ... and at most this many do at once (answered "no ack" beyond)
_Reply = TypeVar("_Reply", bound=Message)


def _header(membership: Membership) -> member_pb2.ResponseHeader:
    return member_pb2.ResponseHeader(node_id=membership.node_id, epoch=membership.epoch, cluster_id=membership.cluster_id)


def _same_cluster(membership: Membership, cluster_id: str, context: grpc.ServicerContext, rpc: str) -> None:
    """Refuse a caller of another cluster. An empty id (a tool or an older caller that does not
    say) is taken as this cluster's: the auth key, not this check, keeps strangers out."""
    if cluster_id and cluster_id != membership.cluster_id:
        _abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{rpc}: the caller belongs to cluster {cluster_id!r}, this node ({membership.node_id}) to "
            f"{membership.cluster_id!r}; check --cluster-id and --seed",
        )


def _records(context: grpc.ServicerContext, rpc: str, protos: Sequence[member_pb2.Member]) -> list[Member]:
    if len(protos) > MAX_GOSSIP_IN:
        _invalid(context, f"{rpc}: {len(protos)} gossip records, more than {MAX_GOSSIP_IN}")
    try:
        return [member_from_proto(p) for p in protos]
    except ValueError as exc:
        _invalid(context, f"{rpc}: {exc}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _invalid(context: grpc.ServicerContext, message: str) -> NoReturn:
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)


def _own_record(membership: Membership, p: member_pb2.Member, context: grpc.ServicerContext, rpc: str) -> Member:
    """The caller's record of itself, validated; a caller claiming this node's id is refused."""
    try:
        record = member_from_proto(p)
    except ValueError as exc:
        _invalid(context, f"{rpc}: {exc}")
    if record.node_id == membership.node_id:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node id {record.node_id!r} is already taken by the node at {membership.local.control_endpoint}; "
            "give every node its own --node-id",
        )
    return record


def _merge(context: grpc.ServicerContext, rpc: str, apply: Callable[[], bool]) -> bool:
    """Run a membership update; its range checks refuse with INVALID_ARGUMENT (nothing changed)."""
    try:
        return apply()
    except ValueError as exc:
        _invalid(context, f"{rpc}: {exc}")


def _checked_stats(stats: maintenance_pb2.NodeStats) -> maintenance_pb2.NodeStats:
    """A peer's statistics, every counter in range (they are summed into the cluster total)."""
    for field, value in stats.ListFields():
        if isinstance(value, int):
            check_figure(value, f"stats {field.name}")
    return stats


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    def __init__(
        self,
        membership: Membership,
        keepalive_s: float,
        max_watchers: int,
        swim: Swim | None = None,
        count: Count = lambda direction, n: None,
    ) -> None:
        self._m = membership
        self._keepalive_s = keepalive_s
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        self._swim = swim
        self._count = count
        # PingReqs wait on a ping while holding a server thread: a few at once, the rest unanswered.
        self._ping_req_slots = threading.BoundedSemaphore(_MAX_PING_REQS)

    def _view(self) -> member_pb2.View:
        return view_to_proto(*self._m.view())

    def MemberList(
        self, request: cluster_pb2.MemberListRequest, context: grpc.ServicerContext
    ) -> cluster_pb2.MemberListResponse:
        return cluster_pb2.MemberListResponse(header=_header(self._m), view=self._view())

    def Join(self, request: cluster_pb2.JoinRequest, context: grpc.ServicerContext) -> cluster_pb2.JoinResponse:
        self._count("received", request.ByteSize())
        _same_cluster(self._m, request.cluster_id, context, "Join")
        record = _own_record(self._m, request.member, context, "Join")
        if record.state is not State.ALIVE:
            _invalid(context, f"Join: a joining member must be ALIVE, got {record.state}")
        if _merge(context, "Join", lambda: self._m.heard_from(record)):
            log.info(
                "member %s joined (incarnation %d, control %s)",
                record.node_id,
                record.incarnation,
                record.control_endpoint,
            )
        return self._sent(cluster_pb2.JoinResponse(header=_header(self._m), view=self._view()))

    def _sent(self, reply: _Reply) -> _Reply:
        self._count("sent", reply.ByteSize())
        return reply

    def Leave(self, request: cluster_pb2.LeaveRequest, context: grpc.ServicerContext) -> cluster_pb2.LeaveResponse:
        self._count("received", request.ByteSize())
        if request.node_id == self._m.node_id:
            _invalid(context, "Leave: a node leaves by stopping, not by being told to")
        known = self._m.get(request.node_id)
        if known is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"Leave: no member {request.node_id!r}")
        try:
            check_incarnation(request.incarnation, f"Leave {request.node_id}")
        except ValueError as exc:
            _invalid(context, f"Leave: {exc}")
        if request.incarnation >= known.incarnation:  # an earlier life's goodbye must not remove a restart
            left = Member(
                node_id=known.node_id,
                incarnation=request.incarnation,
                state=State.LEFT,
                data_endpoint=known.data_endpoint,
                control_endpoint=known.control_endpoint,
                transports=known.transports,
            )
            if _merge(context, "Leave", lambda: self._m.heard_from(left)):
                log.info("member %s left", request.node_id)
        return self._sent(cluster_pb2.LeaveResponse(header=_header(self._m), view=self._view()))

    def Heartbeat(
        self, request: cluster_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> cluster_pb2.HeartbeatResponse:
        """Anti-entropy: a full-view exchange, now and then (see ``swim``)."""
        self._count("received", request.ByteSize())
        _same_cluster(self._m, request.cluster_id, context, "Heartbeat")
        record = _own_record(self._m, request.member, context, "Heartbeat")
        try:
            epoch, members = view_from_proto(request.view)
        except ValueError as exc:
            _invalid(context, f"Heartbeat: {exc}")
        _merge(context, "Heartbeat", lambda: self._m.heard_from(record))
        _merge(context, "Heartbeat", lambda: self._m.merge(epoch, members, source=record.node_id))
        return self._sent(
            cluster_pb2.HeartbeatResponse(header=_header(self._m), member=member_to_proto(self._m.local), view=self._view())
        )

    def Ping(self, request: cluster_pb2.PingRequest, context: grpc.ServicerContext) -> cluster_pb2.PingResponse:
        """SWIM's ack: our record, the caller's as we hold it (its echo), a few recent changes."""
        self._count("received", request.ByteSize())
        _same_cluster(self._m, request.cluster_id, context, "Ping")
        record = _own_record(self._m, request.member, context, "Ping")
        gossip = _records(context, "Ping", request.gossip)
        if request.HasField("target"):
            gossip += _records(context, "Ping", [request.target])  # us as the caller holds us: its echo
        _merge(context, "Ping", lambda: self._m.heard_from(record))
        _merge(
            context,
            "Ping",
            lambda: self._m.absorb(gossip, source=record.node_id, epoch=request.epoch, digest=request.view_digest),
        )
        reply = cluster_pb2.PingResponse(
            header=_header(self._m),
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

    def PingReq(self, request: cluster_pb2.PingReqRequest, context: grpc.ServicerContext) -> cluster_pb2.PingReqResponse:
        """Probe ``target`` for the caller, which got no direct ack; relay the ack if one comes."""
        self._count("received", request.ByteSize())
        _same_cluster(self._m, request.cluster_id, context, "PingReq")
        record = _own_record(self._m, request.member, context, "PingReq")
        gossip = _records(context, "PingReq", request.gossip)
        if not request.HasField("target"):
            _invalid(context, "PingReq: no target")
        target = _records(context, "PingReq", [request.target])[0]
        _merge(context, "PingReq", lambda: self._m.heard_from(record))
        _merge(context, "PingReq", lambda: self._m.absorb(gossip, source=record.node_id))
        reply = cluster_pb2.PingReqResponse(header=_header(self._m), member=member_to_proto(self._m.local))
        if target.node_id == self._m.node_id:  # the caller asks us about us: we are the ack
            reply.acked = True
            reply.target.CopyFrom(member_to_proto(self._m.local))
            seen = self._m.get(record.node_id)
            if seen is not None:
                reply.seen.CopyFrom(member_to_proto(seen))
        elif self._swim is not None and self._ping_req_slots.acquire(blocking=False):
            try:
                remaining = context.time_remaining()
                wait = min(request.timeout_ms / 1000, _MAX_PING_REQ_S)
                if remaining is not None:
                    wait = min(wait, remaining * 0.9)
                ack = self._swim.ping_for(target, record.node_id, wait) if wait > 0 else None
            finally:
                self._ping_req_slots.release()
            if ack is not None:
                reply.acked = True
                reply.target.CopyFrom(ack.member)
                if ack.HasField("seen_origin"):
                    reply.seen.CopyFrom(ack.seen_origin)
        reply.gossip.extend(member_to_proto(r) for r in self._m.piggyback(MAX_PIGGYBACK))
        return self._sent(reply)

    def Watch(
        self, request: cluster_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[cluster_pb2.WatchResponse]:
        # Each watch holds a server thread for its lifetime, hence the cap.
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many watchers on this node; watch another member")
        keepalive_ms = int(self._keepalive_s * 1000)
        try:
            sent = request.start_epoch
            while context.is_active() and not self._m.closed:
                epoch, members = self._m.view()
                if epoch != sent or sent == 0:
                    yield cluster_pb2.WatchResponse(
                        header=_header(self._m), view=view_to_proto(epoch, members), keepalive_ms=keepalive_ms
                    )
                    sent = epoch
                else:
                    yield cluster_pb2.WatchResponse(header=_header(self._m), keepalive_ms=keepalive_ms)
                self._m.wait_changed(epoch, self._keepalive_s)
        finally:
            self._watch_slots.release()


class MaintenanceService(maintenance_pb2_grpc.MaintenanceServicer):
    def __init__(
        self, membership: Membership, status: Callable[[], maintenance_pb2.StatusResponse], peers: Peers
    ) -> None:
        self._m = membership
        self._status = status
        self._peers = peers

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
            header=_header(self._m),
            nodes=nodes,
            total=total(n.stats for n in nodes if n.HasField("stats")),
            members_up=up,
            members_down=len(nodes) - up,
        )


class SessionService(session_pb2_grpc.SessionServicer):
    def __init__(self, membership: Membership, key: bytes | None) -> None:
        self._m = membership
        self._key = key

    def Hello(self, request: session_pb2.HelloRequest, context: grpc.ServicerContext) -> session_pb2.HelloResponse:
        if request.protocol_version != VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client speaks memkv protocol v{request.protocol_version}, this node speaks v{VERSION}",
            )
        if len(request.client_nonce) > _MAX_NONCE:
            _invalid(context, f"Hello: client_nonce over {_MAX_NONCE} bytes")
        me = self._m.local
        offered = list(request.transports) or ["tcp"]
        chosen = next((t for t in offered if t in me.transports), None)
        if chosen is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no common transport: client offers {offered}, node {me.node_id} has {list(me.transports)}",
            )
        proof = auth.session_proof(self._key, request.client_nonce) if self._key is not None else b""
        return session_pb2.HelloResponse(
            header=_header(self._m),
            protocol_version=VERSION,
            transport=chosen,
            data_endpoint=me.data_endpoint,
            server_proof=proof,
        )
