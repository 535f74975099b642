"""Never a wrong byte on the control plane: proofs bound to one request for one node, answers
that prove the key, integers from peers range-checked, refusals that cannot flood log or memory.

Real in-process nodes on 127.0.0.1 (``cluster_util``); where a misbehaving peer is needed, a
small fake gRPC server in this file plays it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from typing import Any

import grpc
import pytest
from cluster_util import DEAD_S, HEARTBEAT_S, InProcCluster, InProcNode, member_list, raw_call, signed, wait_until

from lmcache_memkv.cluster import ClusterClient
from lmcache_memkv.cluster.watch import ViewWatcher
from lmcache_memkv.control.auth import HEADER, ClientAuthInterceptor, NodeNames, ProofChecker, body_digest, sign
from lmcache_memkv.control.channel import ChannelPool, open_channel
from lmcache_memkv.control.convert import INCARNATION_SLACK_MS, MAX_EPOCH, max_incarnation, member_to_proto
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.membership import Membership
from lmcache_memkv.control.peers import LogThrottle
from lmcache_memkv.control.response_auth import (
    MEMBER_LIST,
    WATCH,
    ReplyRefused,
    check_reply,
    fresh_nonce,
    sign_reply,
)
from lmcache_memkv.errors import ConnectError
from lmcache_memkv.node.launcher import memkv_command, node_env
from lmcache_memkv.proto.memkv.v1 import (
    cluster_pb2,
    cluster_pb2_grpc,
    maintenance_pb2,
    maintenance_pb2_grpc,
    member_pb2,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
JOIN = "/memkv.v1.Cluster/Join"
HEARTBEAT = "/memkv.v1.Cluster/Heartbeat"
U64_MAX = (1 << 64) - 1


def _code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.Call)
    return exc.code()


def _record(node_id: str, incarnation: int | None = None, state: State = State.ALIVE, **kw: Any) -> Member:
    inc = time.time_ns() // 1_000_000 if incarnation is None else incarnation
    return Member(node_id, inc, state, "127.0.0.1:1", kw.pop("control", "127.0.0.1:2"), **kw)


def _ids(endpoint: str, key: bytes | None = KEY) -> set[str]:
    return {m.node_id for m in member_list(endpoint, key)[1]}


@pytest.fixture
def pair() -> Iterator[InProcCluster]:
    cluster = InProcCluster()
    try:
        cluster.add("k1", key=KEY)
        cluster.add("k2", key=KEY)
        cluster.wait_converged(key=KEY)
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------- 1. request proofs


class _Capture(grpc.UnaryUnaryClientInterceptor):
    """Records the metadata of each call as it leaves (what an eavesdropper sees)."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str]] = []

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        self.metadata = list(details.metadata or ())
        return continuation(details, request)


def test_a_captured_proof_serves_one_request_to_one_node_only(pair: InProcCluster) -> None:
    k1, k2 = pair.nodes
    capture = _Capture()
    # A legitimate Join to k1, proved by the real client interceptor; the capture sees its proof.
    channel = grpc.intercept_channel(grpc.insecure_channel(k1.control), ClientAuthInterceptor(KEY, k1.control), capture)
    honest = cluster_pb2.JoinRequest(member=member_to_proto(_record("honest")), nonce=fresh_nonce())
    cluster_pb2_grpc.ClusterStub(channel).Join(honest, timeout=2)
    channel.close()
    proof = capture.metadata
    assert [k for k, _ in proof] == [HEADER] and proof[0][1].startswith("v2.")
    forged = cluster_pb2.JoinRequest(member=member_to_proto(_record("forged"))).SerializeToString()
    with grpc.insecure_channel(k1.control) as to_k1, grpc.insecure_channel(k2.control) as to_k2:
        attempts = {
            "forged body, same node": raw_call(to_k1, JOIN, forged, proof),
            "forged body, other node": raw_call(to_k2, JOIN, forged, proof),
            "same body, other node": raw_call(to_k2, JOIN, honest.SerializeToString(), proof),
            "same body, same node again": raw_call(to_k1, JOIN, honest.SerializeToString(), proof),
        }
    for what, exc in attempts.items():
        assert _code(exc) is grpc.StatusCode.UNAUTHENTICATED, what
    assert "not for this node" in (attempts["same body, other node"].details() or "")  # type: ignore[attr-defined]
    assert "replayed" in (attempts["same body, same node again"].details() or "")  # type: ignore[attr-defined]
    for node in (k1, k2):
        assert "forged" not in _ids(node.control)


def test_node_accepts_proofs_for_each_of_its_own_names() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wildcard = NodeNames("n1", f"0.0.0.0:{port}", port, f"mem1.example:{port}")
    for name in (
        "n1",
        f"mem1.example:{port}",
        f"0.0.0.0:{port}",
        f"127.0.0.1:{port}",
        f"LOCALHOST:{port}",
        f"[::1]:{port}",
        f"{socket.gethostname()}:{port}",
        f"127.0.0.2:{port}",  # an address this host owns: clients may list nodes by IP
    ):
        assert name in wildcard, name
    for name in ("n2", f"127.0.0.1:{port + 1}", f"192.0.2.1:{port}", f"mem2.example:{port}", "garbage"):
        assert name not in wildcard, name
    bound = NodeNames("n1", f"127.0.0.1:{port}", port, f"127.0.0.1:{port}")
    assert f"localhost:{port}" in bound  # resolves to the bound address
    assert f"127.0.0.2:{port}" not in bound  # local, but not where this node listens


def test_a_node_dialed_by_another_of_its_names_accepts_the_proof() -> None:
    node = InProcNode("named", key=KEY)
    try:
        port = node.control.rpartition(":")[2]
        assert _ids(f"localhost:{port}") == {"named"}
    finally:
        node.stop()


def test_replay_memory_is_bounded_and_forgets_only_what_the_window_refuses() -> None:
    now = [1_800_000_000.0]
    target = "127.0.0.1:9901"
    checker = ProofChecker(KEY, {target}, window_s=30, clock=lambda: now[0], max_remembered=100)
    proofs = [sign(KEY, JOIN, target, b"", now=now[0]) for _ in range(101)]
    for proof in proofs[:100]:
        assert checker.check(JOIN, proof, b"") is None
    assert "too many" in (checker.check(JOIN, proofs[100], b"") or "")  # full: refuse, never forget early
    assert checker.remembered() == 100
    now[0] += 30.5  # every remembered proof is now stale: forgetting them loses nothing
    fresh = sign(KEY, JOIN, target, b"", now=now[0])
    assert checker.check(JOIN, fresh, b"") is None
    assert checker.remembered() == 1
    assert "stale" in (checker.check(JOIN, proofs[0], b"") or "")


def test_huge_or_odd_timestamps_are_unauthenticated_not_a_crash(pair: InProcCluster) -> None:
    node = pair.nodes[0]
    good = sign(KEY, HEARTBEAT, node.control, b"")
    _, _, nonce, target, mac = good.split(".")
    with grpc.insecure_channel(node.control) as channel:
        for stamp in ("9" * 5000, "9" * 400, "1" * 16, "-5", "1e9", " 12"):
            exc = raw_call(channel, HEARTBEAT, b"", [(HEADER, f"v2.{stamp}.{nonce}.{target}.{mac}")])
            assert _code(exc) is grpc.StatusCode.UNAUTHENTICATED, stamp[:20]
            exc = raw_call(channel, HEARTBEAT, b"", [(HEADER, f"v1.{stamp}.{nonce}.{mac}")])
            assert _code(exc) is grpc.StatusCode.UNAUTHENTICATED, stamp[:20]
    assert _ids(node.control) == {"k1", "k2"}


# ---------------------------------------------------------------------- 2. answers prove the key


def test_a_keyed_client_refuses_every_answer_of_a_keyless_node() -> None:
    impostor = InProcNode("impostor")  # holds no key: accepts anything, proves nothing
    try:
        with pytest.raises(ReplyRefused, match="no proof"):
            member_list(impostor.control, KEY)
        client = ClusterClient([impostor.control], key=KEY, timeout_s=1.0)
        try:
            with pytest.raises(ConnectError, match="refused"):
                client.start()
        finally:
            client.close()
        # The same client code without a key takes the view (no key, no checks).
        assert _ids(impostor.control, None) == {"impostor"}
        pool = ChannelPool(KEY)
        seen: list[int] = []
        watcher = ViewWatcher(pool, lambda failed: [impostor.control], lambda epoch, members: seen.append(epoch))
        watcher.start()
        time.sleep(0.5)
        watcher.stop()
        pool.close()
        assert seen == []
        env = node_env({"MEMKV_AUTH_KEY": KEY.hex()})
        for command in ("status", "stats"):
            out = subprocess.run(
                [*memkv_command(), command, "--servers", impostor.control, "--timeout", "2"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 1, out.stdout
            assert "proof of the auth key" in out.stderr and "impostor" not in out.stdout
    finally:
        impostor.stop()


def test_answer_proofs_bind_request_index_and_every_byte(pair: InProcCluster) -> None:
    channel = open_channel(pair.nodes[0].control, KEY)
    try:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        reply = stub.MemberList(request, timeout=2)
        check_reply(KEY, MEMBER_LIST, request, reply)
        tampered = cluster_pb2.MemberListResponse()
        tampered.CopyFrom(reply)
        tampered.view.members.add().CopyFrom(member_to_proto(_record("forged")))
        other = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        for what, args in {
            "tampered view": (KEY, MEMBER_LIST, request, tampered),
            "answer to another request": (KEY, MEMBER_LIST, other, reply),
            "another method": (KEY, WATCH, request, reply),
            "another stream position": (KEY, MEMBER_LIST, request, reply, 1),
            "another key": (OTHER_KEY, MEMBER_LIST, request, reply),
        }.items():
            with pytest.raises(ReplyRefused):
                check_reply(*args)  # type: ignore[arg-type]
                pytest.fail(what)
        # Every message of a watch stream carries its own proof, bound to its position.
        watch = cluster_pb2.WatchRequest(nonce=fresh_nonce())
        stream = stub.Watch(watch, timeout=5)
        first = next(stream)
        check_reply(KEY, WATCH, watch, first, 0)
        with pytest.raises(ReplyRefused):
            check_reply(KEY, WATCH, watch, first, 1)
        stream.cancel()
    finally:
        channel.close()
    # Signing is deterministic over the unsigned bytes: re-signing a copy gives the same proof.
    copy = cluster_pb2.MemberListResponse()
    copy.CopyFrom(reply)
    sign_reply(KEY, MEMBER_LIST, body_digest(request.SerializeToString()), copy)
    assert copy.header.proof == reply.header.proof


# ---------------------------------------------------------------------- 5. impostors


def test_impostors_never_join_nor_appear_in_any_view(pair: InProcCluster) -> None:
    k1, k2 = pair.nodes
    other_key = InProcNode("other-key", seeds=[k1.control], key=OTHER_KEY)
    keyless = InProcNode("keyless", seeds=[k2.control])
    # A keyed node that is told to join through the keyless impostor (a wrong --seed).
    misled = InProcNode("misled", seeds=[keyless.control, k1.control], key=KEY)
    client = ClusterClient([k1.control, k2.control], key=KEY, timeout_s=2.0)
    try:
        client.start()
        wait_until("misled joins the keyed cluster", lambda: _ids(k1.control) >= {"misled"}, 5.0)
        time.sleep(DEAD_S + 5 * HEARTBEAT_S)  # heartbeats and seed re-joins had every chance
        for node in (k1, k2, misled):
            assert _ids(node.control) == {"k1", "k2", "misled"}, node.node_id
        assert {m.node_id for m in client.members()} == {"k1", "k2", "misled"}
        assert set(client.node_stats()) == {"k1", "k2", "misled"}
    finally:
        client.close()
        for node in (misled, keyless, other_key):
            node.stop()


# ---------------------------------------------------------------------- 3. integers from peers


def test_out_of_range_integers_are_refused_and_change_nothing(pair: InProcCluster) -> None:
    k1, k2 = pair.nodes
    before = {n.node_id: member_list(n.control, KEY) for n in pair.nodes}
    k2_record = next(m for m in before["k1"][1] if m.node_id == "k2")
    evil = _record("evil")
    view = member_pb2.View(epoch=5, members=[member_to_proto(evil)])
    # A new member in the view, so the old code bumped past the epoch (and failed to encode it).
    huge_epoch = member_pb2.View(epoch=U64_MAX, members=[member_to_proto(_record("evil2"))])
    poison = member_pb2.View(
        epoch=5, members=[member_to_proto(replace(k2_record, incarnation=U64_MAX, state=State.DEAD))]
    )
    requests: dict[str, tuple[str, Any]] = {
        "join, huge incarnation": (
            "Join",
            cluster_pb2.JoinRequest(member=member_to_proto(replace(evil, incarnation=U64_MAX))),
        ),
        "join, incarnation two hours ahead": (
            "Join",
            cluster_pb2.JoinRequest(member=member_to_proto(replace(evil, incarnation=max_incarnation() + 3_600_000))),
        ),
        "join, huge capacity": (
            "Join",
            cluster_pb2.JoinRequest(member=member_to_proto(replace(evil, capacity_bytes=U64_MAX))),
        ),
        "heartbeat, huge epoch": (
            "Heartbeat",
            cluster_pb2.HeartbeatRequest(member=member_to_proto(evil), view=huge_epoch),
        ),
        "heartbeat, epoch past the bound": (
            "Heartbeat",
            cluster_pb2.HeartbeatRequest(member=member_to_proto(evil), view=member_pb2.View(epoch=MAX_EPOCH + 1)),
        ),
        "heartbeat, gossip with a huge incarnation": (
            "Heartbeat",
            cluster_pb2.HeartbeatRequest(member=member_to_proto(evil), view=poison),
        ),
        "heartbeat, huge used bytes": (
            "Heartbeat",
            cluster_pb2.HeartbeatRequest(member=member_to_proto(replace(evil, used_bytes=U64_MAX)), view=view),
        ),
        "leave, huge incarnation": ("Leave", cluster_pb2.LeaveRequest(node_id="k2", incarnation=U64_MAX)),
    }
    channel = open_channel(k1.control, KEY)
    try:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        for what, (rpc, request) in requests.items():
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, rpc)(request, timeout=2)
            assert _code(info.value) is grpc.StatusCode.INVALID_ARGUMENT, what
    finally:
        channel.close()
    for node in (k1, k2):  # every node still answers, with the view it had
        epoch, members = member_list(node.control, KEY)
        assert {m.identity for m in members} == {m.identity for m in before[node.node_id][1]}, node.node_id
        assert epoch == before[node.node_id][0]


def test_membership_refuses_out_of_range_records_without_changing() -> None:
    ms = Membership(_record("a", 1), suspect_after_s=1.0, dead_after_s=2.0)
    epoch = ms.epoch
    for bad in (
        _record("b", U64_MAX),
        _record("b", max_incarnation() + 60_000),
        _record("b", used_bytes=U64_MAX),
        _record("b", capacity_bytes=1 << 60),
    ):
        with pytest.raises(ValueError):
            ms.heard_from(bad)
        with pytest.raises(ValueError):
            ms.merge(0, [_record("c"), bad])
    with pytest.raises(ValueError):
        ms.merge(U64_MAX, [_record("c")])
    assert [m.node_id for m in ms.view()[1]] == ["a"] and ms.epoch == epoch
    # At the bound a refutation (+1) still encodes, and outranks the poison.
    ms.merge(0, [replace(ms.local, incarnation=max_incarnation() - 1, state=State.DEAD)])
    assert ms.local.state is State.ALIVE and ms.local.incarnation < U64_MAX
    member_to_proto(ms.local).SerializeToString()


def test_a_poisoned_record_heals_when_its_node_restarts(pair: InProcCluster) -> None:
    k1, k2 = pair.nodes
    k2.stop()  # the victim is down: nobody refutes the poison until it comes back
    wait_until("k2 LEFT on k1", lambda: member_list(k1.control, KEY)[1][1].state is State.LEFT, 5.0)
    record = member_list(k1.control, KEY)[1][1]
    # The worst record still in range: DEAD, at the highest incarnation k1 accepts.
    poisoned = replace(record, incarnation=max_incarnation() - 1000, state=State.DEAD)
    evil = _record("evil")
    request = cluster_pb2.HeartbeatRequest(
        member=member_to_proto(evil), view=member_pb2.View(epoch=7, members=[member_to_proto(poisoned)])
    )
    channel = open_channel(k1.control, KEY)
    try:
        cluster_pb2_grpc.ClusterStub(channel).Heartbeat(request, timeout=2)
    finally:
        channel.close()
    assert next(m for m in member_list(k1.control, KEY)[1] if m.node_id == "k2") == poisoned
    # Restarted under the same id, its incarnation (start time in ms) is far below the poison,
    # so only a refutation can put it back: it bumps past the poison, which stays encodable.
    assert time.time_ns() // 1_000_000 + 60_000 < poisoned.incarnation
    again = pair.add("k2", key=KEY)

    def healed() -> bool:
        views = [member_list(n.control, KEY)[1] for n in (k1, again)]
        return all(next(m for m in v if m.node_id == "k2").state is State.ALIVE for v in views)

    wait_until("the restarted k2 is ALIVE everywhere", healed, 5.0)
    k2_now = next(m for m in member_list(k1.control, KEY)[1] if m.node_id == "k2")
    assert poisoned.incarnation < k2_now.incarnation <= max_incarnation()
    assert INCARNATION_SLACK_MS == 3_600_000


# ---------------------------------------------------------------------- fake peers


class _FakeCluster(cluster_pb2_grpc.ClusterServicer):
    """A peer that refuses every probe with a new reason, and streams a view with an absurd keepalive."""

    def __init__(self) -> None:
        self.pings = 0

    def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.pings += 1
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"refusal number {self.pings}")

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        view = member_pb2.View(epoch=3, members=[member_to_proto(_record("fake"))])
        yield cluster_pb2.WatchResponse(
            header=member_pb2.ResponseHeader(node_id="fake"), view=view, keepalive_ms=4_000_000_000
        )
        time.sleep(2)


class _FakeMaintenance(maintenance_pb2_grpc.MaintenanceServicer):
    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return maintenance_pb2.StatusResponse(
            header=member_pb2.ResponseHeader(node_id="fake"),
            stats=maintenance_pb2.NodeStats(capacity_bytes=U64_MAX, keys=U64_MAX),
        )


@pytest.fixture
def fake_peer() -> Iterator[tuple[str, _FakeCluster]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = _FakeCluster()
    cluster_pb2_grpc.add_ClusterServicer_to_server(servicer, server)
    maintenance_pb2_grpc.add_MaintenanceServicer_to_server(_FakeMaintenance(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def _join_fake(node: InProcNode, endpoint: str) -> None:
    channel = open_channel(node.control, None)
    try:
        request = cluster_pb2.JoinRequest(member=member_to_proto(_record("fake", control=endpoint)))
        cluster_pb2_grpc.ClusterStub(channel).Join(request, timeout=2)
    finally:
        channel.close()


def test_probe_refusals_are_logged_once_per_peer_per_minute(
    fake_peer: tuple[str, _FakeCluster], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, fake = fake_peer
    node = InProcNode("open")  # keyless, so the fake can join it
    try:
        with caplog.at_level(logging.WARNING, logger="memkv.control"):
            _join_fake(node, endpoint)
            # Until it is DEAD (a refusal is no ack) the node probes its only peer every period.
            wait_until("the node pings the fake peer 3 times", lambda: fake.pings >= 3, 5.0)
        refusals = [r for r in caplog.records if "refused our Ping" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]  # 3+ distinct reasons, one line
        assert endpoint in refusals[0].getMessage()
        assert len(node.plane.swim._logged) <= node.plane.swim._logged.max_keys
    finally:
        node.stop()


def test_log_throttle_bounds_rate_and_memory() -> None:
    now = [0.0]
    throttle = LogThrottle(every_s=60, max_keys=3, clock=lambda: now[0])
    assert throttle.allow("a") and not throttle.allow("a")
    assert throttle.allow("b") and throttle.allow("c")
    assert not throttle.allow("d")  # a fourth key within the minute: quiet, not remembered
    assert len(throttle) == 3
    now[0] = 61.0
    assert throttle.allow("a") and throttle.allow("d")
    assert len(throttle) <= 3


def test_refused_control_calls_are_logged_once_per_caller(caplog: pytest.LogCaptureFixture) -> None:
    node = InProcNode("keyed", key=KEY)
    try:
        with caplog.at_level(logging.WARNING, logger="memkv.control"), grpc.insecure_channel(node.control) as ch:
            for i in range(20):
                raw_call(ch, JOIN, b"", signed(OTHER_KEY, JOIN, node.control, bytes([i])))
        assert len([r for r in caplog.records if "refused control call" in r.getMessage()]) == 1
    finally:
        node.stop()


def test_peer_statistics_out_of_range_are_refused_not_summed(fake_peer: tuple[str, _FakeCluster]) -> None:
    endpoint, _ = fake_peer
    node = InProcNode("open")
    try:
        _join_fake(node, endpoint)
        channel = open_channel(node.control, None)
        try:
            stub = maintenance_pb2_grpc.MaintenanceStub(channel)
            reply = stub.ClusterStats(maintenance_pb2.ClusterStatsRequest(), timeout=5)
        finally:
            channel.close()
        rows = {n.node_id: n for n in reply.nodes}
        assert "out of range" in rows["fake"].error and not rows["fake"].HasField("stats")
        assert reply.total.capacity_bytes == node.config.capacity
    finally:
        node.stop()


@pytest.mark.parametrize("key", [None, KEY])
def test_a_watch_stream_out_of_range_or_unproven_is_dropped(
    fake_peer: tuple[str, _FakeCluster], key: bytes | None
) -> None:
    endpoint, _ = fake_peer
    pool = ChannelPool(key)
    seen: list[int] = []
    watcher = ViewWatcher(pool, lambda failed: [endpoint], lambda epoch, members: seen.append(epoch))
    try:
        watcher.start()
        time.sleep(0.5)
    finally:
        watcher.stop()
        pool.close()
    assert seen == []


def _request(method: str) -> Any:
    """A fresh, valid request for ``method`` (its own nonce, so its bytes are unique)."""
    from lmcache_memkv.proto.memkv.v1 import session_pb2
    from lmcache_memkv.wire.constants import VERSION

    name = method.rsplit("/", 1)[1]
    if name == "Hello":
        return session_pb2.HelloRequest(client_id="c", protocol_version=VERSION, transports=["tcp"], client_nonce=fresh_nonce())
    module = session_pb2 if "Session" in method else maintenance_pb2 if "Maintenance" in method else cluster_pb2
    msg = getattr(module, f"{name}Request")()
    if name == "Join":
        msg.member.CopyFrom(member_to_proto(_record(f"visitor-{time.time_ns()}")))
    elif name == "Heartbeat":
        msg.member.CopyFrom(member_to_proto(_record(f"visitor-{time.time_ns()}")))
    elif name == "Leave":
        msg.node_id, msg.incarnation = "ghost", 1
    if "nonce" in msg.DESCRIPTOR.fields_by_name:
        msg.nonce = fresh_nonce()
    return msg


def _attempt(channel: grpc.Channel, method: str, body: bytes, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    """The status a raw call ends with (OK if it was served); a stream is read to its first message."""
    try:
        if method.endswith("/Watch"):
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=2
            )
            next(iter(call))
            call.cancel()
        else:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=2
            )
    except grpc.RpcError as exc:
        return _code(exc)
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "method",
    [
        "/memkv.v1.Cluster/MemberList",
        "/memkv.v1.Cluster/Join",
        "/memkv.v1.Cluster/Leave",
        "/memkv.v1.Cluster/Heartbeat",
        "/memkv.v1.Cluster/Watch",
        "/memkv.v1.Maintenance/Status",
        "/memkv.v1.Maintenance/ClusterStats",
        "/memkv.v1.Session/Hello",
    ],
)
def test_every_method_refuses_replayed_and_forged_proofs(pair: InProcCluster, method: str) -> None:
    """For every control method: a proof seen on the wire (one honest call to k1) is refused when
    replayed to k1, replayed to k2, or attached to another body. Before the fix a proof bound only
    the method, time and nonce, and replay was remembered per node: it opened every other node."""
    k1, k2 = pair.nodes
    honest = _request(method).SerializeToString()
    captured = signed(KEY, method, k1.control, honest)
    forged = _request(method).SerializeToString()
    assert forged != honest
    with grpc.insecure_channel(k1.control) as to_k1, grpc.insecure_channel(k2.control) as to_k2:
        first = _attempt(to_k1, method, honest, captured)
        assert first is not grpc.StatusCode.UNAUTHENTICATED, f"the honest call was refused: {first}"
        assert _attempt(to_k1, method, honest, captured) is grpc.StatusCode.UNAUTHENTICATED  # replayed
        assert _attempt(to_k2, method, honest, captured) is grpc.StatusCode.UNAUTHENTICATED  # another node
        fresh = signed(KEY, method, k1.control, honest)  # even unused, a proof binds its body
        assert _attempt(to_k1, method, forged, fresh) is grpc.StatusCode.UNAUTHENTICATED
        assert _attempt(to_k1, method, honest, fresh) is not grpc.StatusCode.UNAUTHENTICATED  # and is good for it
