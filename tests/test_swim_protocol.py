"""SWIM over real gRPC between in-process nodes: cluster ids, the echo in acks, PingReq, and
the membership traffic counter on a real node process."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest
from cluster_util import HEARTBEAT_S, InProcCluster, InProcNode, member_list, wait_until
from nodeproc import NodeFactory

from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.control.convert import member_to_proto
from lmcache_memkv.control.member import State
from lmcache_memkv.control.response_auth import MEMBER_LIST, PING, PING_REQ, ReplyRefused, check_reply, fresh_nonce
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc

KEY = bytes(range(40, 72))


def _stub(node: InProcNode, key: bytes | None = None) -> tuple[grpc.Channel, cluster_pb2_grpc.ClusterStub]:
    channel = open_channel(node.control, key)
    return channel, cluster_pb2_grpc.ClusterStub(channel)


def test_calls_from_another_cluster_are_refused_clearly() -> None:
    node = InProcNode("a")
    other = InProcNode("x", cluster_id="other")  # a node of another cluster, as the caller
    channel, stub = _stub(node)
    try:
        me = member_to_proto(other.plane.membership.local)
        calls = {
            "Join": lambda: stub.Join(cluster_pb2.JoinRequest(member=me, cluster_id="other"), timeout=2),
            "Ping": lambda: stub.Ping(cluster_pb2.PingRequest(member=me, cluster_id="other"), timeout=2),
            "PingReq": lambda: stub.PingReq(
                cluster_pb2.PingReqRequest(member=me, target=me, cluster_id="other"), timeout=2
            ),
            "Heartbeat": lambda: stub.Heartbeat(cluster_pb2.HeartbeatRequest(member=me, cluster_id="other"), timeout=2),
        }
        for rpc, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION, rpc
            assert "cluster 'other'" in (info.value.details() or "") and "'memkv'" in (info.value.details() or ""), rpc
        assert set(m.node_id for m in member_list(node.control)[1]) == {"a"}  # nothing merged
    finally:
        channel.close()
        other.stop()
        node.stop()


def test_a_node_seeded_with_another_cluster_stays_out_of_it() -> None:
    a = InProcNode("a")
    try:
        x = InProcNode("x", seeds=[a.control], cluster_id="other")
        try:
            time.sleep(10 * HEARTBEAT_S)  # seed re-joins and probes had every chance
            assert {m.node_id for m in member_list(a.control)[1]} == {"a"}
            assert {m.node_id for m in member_list(x.control)[1]} == {"x"}
        finally:
            x.stop()
    finally:
        a.stop()


def test_the_cluster_id_is_in_every_header_and_under_the_proof() -> None:
    node = InProcNode("a", key=KEY, cluster_id="prod-1")
    channel, stub = _stub(node, KEY)
    try:
        request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        reply = stub.MemberList(request, timeout=2)
        assert reply.header.cluster_id == "prod-1"
        check_reply(KEY, MEMBER_LIST, request, reply)
        forged = cluster_pb2.MemberListResponse()
        forged.CopyFrom(reply)
        forged.header.cluster_id = "memkv"
        with pytest.raises(ReplyRefused):
            check_reply(KEY, MEMBER_LIST, request, forged)
    finally:
        channel.close()
        node.stop()


def test_an_ack_echoes_the_callers_record_and_a_ping_req_relays_it() -> None:
    cluster = InProcCluster()
    try:
        a, b, c = (cluster.add(n) for n in ("a", "b", "c"))
        cluster.wait_converged()
        caller = a.plane.membership.local
        channel, stub = _stub(b)
        try:
            # A direct ping carrying a stale record of the target: the target refutes at once.
            stale = replace(b.plane.membership.local, state=State.SUSPECT)
            request = cluster_pb2.PingRequest(
                member=member_to_proto(caller), target=member_to_proto(stale), nonce=fresh_nonce(), cluster_id="memkv"
            )
            reply = stub.Ping(request, timeout=2)
            check_reply(None, PING, request, reply)
            assert reply.member.node_id == "b" and reply.member.incarnation > stale.incarnation
            assert reply.seen.node_id == "a" and reply.seen.incarnation == caller.incarnation
            # PingReq: b probes c for a and relays c's ack with c's record of a.
            request2 = cluster_pb2.PingReqRequest(
                member=member_to_proto(caller),
                target=member_to_proto(c.plane.membership.local),
                nonce=fresh_nonce(),
                cluster_id="memkv",
                timeout_ms=1000,
            )
            reply2 = stub.PingReq(request2, timeout=2)
            check_reply(None, PING_REQ, request2, reply2)
            assert reply2.acked and reply2.target.node_id == "c"
            assert reply2.seen.node_id == "a" and reply2.seen.incarnation == caller.incarnation
        finally:
            channel.close()
        c.stop()  # a target that is gone: no ack, in bounded time
        channel, stub = _stub(b)
        try:
            request3 = cluster_pb2.PingReqRequest(
                member=member_to_proto(caller),
                target=member_to_proto(c.plane.membership.local),
                nonce=fresh_nonce(),
                cluster_id="memkv",
                timeout_ms=300,
            )
            started = time.monotonic()
            assert not stub.PingReq(request3, timeout=2).acked
            assert time.monotonic() - started < 2
        finally:
            channel.close()
    finally:
        cluster.stop()


def test_membership_traffic_is_counted_on_the_metrics_port(node_factory: NodeFactory) -> None:
    fast = ["--heartbeat-interval", "0.2", "--suspect-after", "0.6", "--dead-after", "1.2"]
    a = node_factory(capacity="4MiB", args=["--node-id", "a", *fast])
    b = node_factory(capacity="4MiB", args=["--node-id", "b", "--seed", str(a.control), *fast])
    wait_until("b sees a", lambda: {m.node_id for m in member_list(str(b.control))[1]} == {"a", "b"}, 10)
    first = {n.node_id: (n.metric("memkv_gossip_bytes_total", direction="sent"),
                         n.metric("memkv_gossip_bytes_total", direction="received")) for n in (a, b)}
    time.sleep(1.0)
    for n in (a, b):
        sent = n.metric("memkv_gossip_bytes_total", direction="sent", node=n.node_id)
        received = n.metric("memkv_gossip_bytes_total", direction="received", node=n.node_id)
        assert sent > first[n.node_id][0] and received > first[n.node_id][1], (n.node_id, sent, received)
