"""Control-call authentication, garbage requests, session set-up and TLS.

Unauthenticated or wrongly keyed calls fail with UNAUTHENTICATED and change nothing; bytes
that do not parse fail with INVALID_ARGUMENT, unknown methods with UNIMPLEMENTED; the node
keeps serving throughout.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster_util import InProcCluster, InProcNode, member_list, raw_call, signed, wait_until

from lmcache_memkv.control.auth import HEADER, ProofChecker, session_proof, sign
from lmcache_memkv.control.channel import open_channel
from lmcache_memkv.control.convert import member_to_proto
from lmcache_memkv.control.member import Member, State
from lmcache_memkv.control.response_auth import check_reply, fresh_nonce
from lmcache_memkv.endpoints import parse_endpoint
from lmcache_memkv.proto.memkv.v1 import cluster_pb2, cluster_pb2_grpc, session_pb2, session_pb2_grpc
from lmcache_memkv.wire.constants import VERSION

KEY = bytes(range(32))
OTHER_KEY = bytes(32)
MEMBER_LIST = "/memkv.v1.Cluster/MemberList"
JOIN = "/memkv.v1.Cluster/Join"
HEARTBEAT = "/memkv.v1.Cluster/Heartbeat"


# ---------------------------------------------------------------------- proofs (no sockets)


def test_proof_round_trip_and_refusals() -> None:
    now = 1_800_000_000.0
    me, other = "127.0.0.1:9901", "127.0.0.1:9903"
    checker = ProofChecker(KEY, {me}, window_s=30, clock=lambda: now)
    body = b"join body"
    good = sign(KEY, JOIN, me, body, now=now)
    assert good.startswith("v2.")
    assert checker.check(JOIN, good, body) is None
    assert checker.check(JOIN, good, body) == "auth proof replayed"
    assert "wrong auth key" in (checker.check(JOIN, sign(OTHER_KEY, JOIN, me, body, now=now), body) or "")
    # Bound to the method, the body and the target.
    assert "wrong auth key" in (checker.check(MEMBER_LIST, sign(KEY, JOIN, me, body, now=now), body) or "")
    assert "wrong auth key" in (checker.check(JOIN, sign(KEY, JOIN, me, body, now=now), b"forged body") or "")
    assert "not for this node" in (checker.check(JOIN, sign(KEY, JOIN, other, body, now=now), body) or "")
    assert "stale" in (checker.check(JOIN, sign(KEY, JOIN, me, body, now=now - 31), body) or "")
    assert "stale" in (checker.check(JOIN, sign(KEY, JOIN, me, body, now=now + 31), body) or "")
    assert checker.check(JOIN, sign(KEY, JOIN, me, body, now=now - 29), body) is None
    assert "requires an auth key" in (checker.check(JOIN, None, body) or "")
    for junk in ("", "v1", "v2.1.2.3", "v1.x.y.z", "v1.1.2", "v1.1.ab.cd.ef", good.replace("v2.", "v1.", 1)):
        assert checker.check(JOIN, junk, body) is not None, junk
    assert ProofChecker(None, set()).check(JOIN, None, body) is None  # no key configured: open


# ---------------------------------------------------------------------- against a node


@pytest.fixture(scope="module")
def keyed_node() -> Iterator[InProcNode]:
    node = InProcNode("keyed", key=KEY)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def bare_channel(keyed_node: InProcNode) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(keyed_node.control)
    try:
        yield channel
    finally:
        channel.close()


def _intruder() -> cluster_pb2.JoinRequest:
    m = Member("intruder", 1, State.ALIVE, "127.0.0.1:1", "127.0.0.1:2")
    return cluster_pb2.JoinRequest(member=member_to_proto(m))


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(exc, grpc.Call)
    return exc.code()


def test_unauthenticated_calls_are_refused_and_change_nothing(
    keyed_node: InProcNode, bare_channel: grpc.Channel
) -> None:
    epoch_before, members_before = member_list(keyed_node.control, KEY)
    join = _intruder().SerializeToString()
    me = keyed_node.control
    cases = {
        "no proof": [],
        "wrong key": signed(OTHER_KEY, JOIN, me, join),
        "proof for another method": signed(KEY, MEMBER_LIST, me, join),
        "proof for another body": signed(KEY, JOIN, me, b""),
        "proof for another node": signed(KEY, JOIN, "127.0.0.1:1", join),
        "stale proof": [(HEADER, sign(KEY, JOIN, me, join, now=time.time() - 120))],
        "malformed proof": [(HEADER, "v1.garbage")],
    }
    for what, metadata in cases.items():
        exc = raw_call(bare_channel, JOIN, join, metadata)
        assert _code(exc) is grpc.StatusCode.UNAUTHENTICATED, what
    # A replayed proof: the first use works, the second is refused.
    replay = signed(KEY, MEMBER_LIST, me)
    stub = cluster_pb2_grpc.ClusterStub(bare_channel)
    stub.MemberList(cluster_pb2.MemberListRequest(), metadata=replay, timeout=2)
    with pytest.raises(grpc.RpcError) as info:
        stub.MemberList(cluster_pb2.MemberListRequest(), metadata=replay, timeout=2)
    assert _code(info.value) is grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in (info.value.details() or "")  # type: ignore[attr-defined]
    # Streams are guarded too, and so are unknown methods (no probing without the key).
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.Watch(cluster_pb2.WatchRequest(), timeout=2)))
    assert _code(info.value) is grpc.StatusCode.UNAUTHENTICATED
    assert _code(raw_call(bare_channel, "/memkv.v1.Cluster/Nope", b"")) is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.Watch(cluster_pb2.WatchRequest(), metadata=signed(KEY, MEMBER_LIST, me), timeout=2)))
    assert _code(info.value) is grpc.StatusCode.UNAUTHENTICATED  # a proof for another method
    epoch_after, members_after = member_list(keyed_node.control, KEY)
    assert "intruder" not in {m.node_id for m in members_after}
    assert {m.identity for m in members_after} == {m.identity for m in members_before}
    assert epoch_after == epoch_before


def test_garbage_requests_are_rejected_cleanly(keyed_node: InProcNode, bare_channel: grpc.Channel) -> None:
    # Bytes that are no protobuf at all (field 0 / wire type 7).
    me = keyed_node.control
    garbage = b"\xff\xff\xff\xff\x0f"
    for method in (JOIN, HEARTBEAT, MEMBER_LIST, "/memkv.v1.Maintenance/Status", "/memkv.v1.Session/Hello"):
        exc = raw_call(bare_channel, method, garbage, signed(KEY, method, me, garbage))
        assert _code(exc) is grpc.StatusCode.INVALID_ARGUMENT, method
        assert "does not parse" in (exc.details() or "")  # type: ignore[attr-defined]
    # Well-formed protobuf with the wrong meaning: a heartbeat without a sender, a bad endpoint.
    exc = raw_call(bare_channel, HEARTBEAT, b"", signed(KEY, HEARTBEAT, me))
    assert _code(exc) is grpc.StatusCode.INVALID_ARGUMENT
    bad = _intruder()
    bad.member.control_endpoint = "no-port"
    exc = raw_call(bare_channel, JOIN, bad.SerializeToString(), signed(KEY, JOIN, me, bad.SerializeToString()))
    assert _code(exc) is grpc.StatusCode.INVALID_ARGUMENT
    # A request another node's id: refused, not merged.
    clash = _intruder()
    clash.member.node_id = keyed_node.node_id
    exc = raw_call(bare_channel, JOIN, clash.SerializeToString(), signed(KEY, JOIN, me, clash.SerializeToString()))
    assert _code(exc) is grpc.StatusCode.FAILED_PRECONDITION
    # Unknown methods, authenticated: UNIMPLEMENTED.
    for method in ("/memkv.v1.Cluster/Nope", "/etcdserverpb.KV/Range"):
        assert _code(raw_call(bare_channel, method, b"", signed(KEY, method, me))) is grpc.StatusCode.UNIMPLEMENTED
    # Not gRPC at all on the control port.
    host, port = parse_endpoint(keyed_node.control)
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64)):
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(junk)
            sock.settimeout(2)
            try:
                sock.recv(1024)
            except OSError:
                pass
    # Still serving, and nothing was added.
    _, members = member_list(keyed_node.control, KEY)
    assert [m.node_id for m in members] == [keyed_node.node_id]


def test_node_without_key_accepts_calls_without_proof() -> None:
    node = InProcNode("open")
    try:
        _, members = member_list(node.control, None)
        assert [m.node_id for m in members] == ["open"]
    finally:
        node.stop()


def test_cluster_with_a_key_forms_and_rejects_a_keyless_member() -> None:
    cluster = InProcCluster()
    try:
        cluster.add("k1", key=KEY)
        cluster.add("k2", key=KEY)
        cluster.wait_converged(key=KEY)
        # A node holding no key cannot join: its calls are refused, the view stays as it was.
        stray = InProcNode("stray", seeds=[cluster.nodes[0].control], key=None)
        try:
            time.sleep(5 * 0.2)
            assert {m.node_id for m in member_list(cluster.nodes[0].control, KEY)[1]} == {"k1", "k2"}
        finally:
            stray.stop()
    finally:
        cluster.stop()


def test_session_hello(keyed_node: InProcNode) -> None:
    channel = open_channel(keyed_node.control, KEY)
    try:
        stub = session_pb2_grpc.SessionStub(channel)
        nonce = os.urandom(32)
        reply = stub.Hello(
            session_pb2.HelloRequest(
                client_id="t", protocol_version=VERSION, transports=["rdma", "tcp"], client_nonce=nonce
            ),
            timeout=2,
        )
        assert reply.transport == "tcp"  # the node offers TCP only (no RDMA device here)
        assert reply.data_endpoint == keyed_node.data
        assert hmac.compare_digest(reply.server_proof, session_proof(KEY, nonce))
        assert reply.server_proof != hmac.new(OTHER_KEY, nonce, hashlib.sha256).digest()
        for request, code in (
            (session_pb2.HelloRequest(protocol_version=VERSION + 1), grpc.StatusCode.FAILED_PRECONDITION),
            (
                session_pb2.HelloRequest(protocol_version=VERSION, transports=["rdma"]),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (
                session_pb2.HelloRequest(protocol_version=VERSION, client_nonce=bytes(65)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Hello(request, timeout=2)
            assert _code(info.value) is code
    finally:
        channel.close()


# ---------------------------------------------------------------------- TLS


def _self_signed(tmp: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memkv-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "node.pem", tmp / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_tls_cluster_and_client(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key_file = _self_signed(tmp_path)
    from lmcache_memkv.cluster import ClusterClient

    cluster = InProcCluster()
    client = None
    try:
        cluster.add("t1", key=KEY, tls=(cert, key_file))
        cluster.add("t2", key=KEY, tls=(cert, key_file))  # nodes trust their own certificate for peer calls

        def converged() -> bool:
            client_view = member_list_tls(cluster.nodes[1].control, cert)
            return {m.node_id: str(m.state) for m in client_view} == {"t1": "ALIVE", "t2": "ALIVE"}

        wait_until("TLS nodes see each other", converged, 5.0)
        client = ClusterClient([cluster.nodes[0].control], key=KEY, tls_ca=cert, timeout_s=2.0)
        client.start()
        assert {m.node_id for m in client.members()} == {"t1", "t2"}
        assert client.put([b"k"], [b"v"]) == [True]
        # Plaintext against a TLS port gets nowhere.
        with pytest.raises(grpc.RpcError):
            member_list(cluster.nodes[0].control, KEY, timeout_s=1.0)
    finally:
        if client is not None:
            client.close()
        cluster.stop()


def member_list_tls(endpoint: str, ca: str) -> list[Member]:
    from lmcache_memkv.control.convert import view_from_proto

    channel = open_channel(endpoint, KEY, tls_ca=ca)
    try:
        request = cluster_pb2.MemberListRequest(nonce=fresh_nonce())
        reply = cluster_pb2_grpc.ClusterStub(channel).MemberList(request, timeout=2)
        check_reply(KEY, MEMBER_LIST, request, reply)
        return view_from_proto(reply.view)[1]
    finally:
        channel.close()
