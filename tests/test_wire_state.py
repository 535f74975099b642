"""Connection state machines of both ends, driven without sockets."""

from __future__ import annotations

import pytest

from lmcache_memkv.errors import AuthError, ProtocolError, ServerError
from lmcache_memkv.wire.constants import ErrorCode, Op, Status
from lmcache_memkv.wire.frames import HEADER_LEN, MAX_REQUEST_ID, Header, decode_header
from lmcache_memkv.wire.limits import DEFAULT_LIMITS
from lmcache_memkv.wire.messages import (
    AuthOk,
    ErrorFrame,
    ExistsResponse,
    Message,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    decode,
    encode,
)
from lmcache_memkv.wire.state import ClientProtocol, ConnState, ServerProtocol

KEY = bytes(range(32))


def parse(frame: bytes) -> tuple[Header, Message]:
    header = decode_header(frame[:HEADER_LEN], DEFAULT_LIMITS)
    return header, decode(header, frame[HEADER_LEN:], DEFAULT_LIMITS)


def handshake(server: ServerProtocol, client: ClientProtocol) -> None:
    auth = client.on_hello(*parse(server.hello()))
    client.on_auth_reply(*parse(server.on_auth(*parse(auth))))


@pytest.mark.parametrize(("server_key", "client_key"), [(None, None), (KEY, KEY)])
def test_handshake_succeeds(server_key: bytes | None, client_key: bytes | None) -> None:
    server = ServerProtocol("n1", server_key)
    client = ClientProtocol(client_key)
    handshake(server, client)
    assert server.state is ConnState.READY and client.state is ConnState.READY
    assert client.node_id == "n1"


def test_client_with_a_key_refuses_a_node_that_needs_none() -> None:
    """No downgrade: a node that says "no auth" cannot prove the key, so a keyed client refuses it."""
    client = ClientProtocol(KEY, where="memkv node X")
    with pytest.raises(AuthError, match="needs no auth key, but this client has one"):
        client.on_hello(*parse(ServerProtocol("n1", None).hello()))
    assert client.state is ConnState.CLOSED


@pytest.mark.parametrize("node_key", [b"\x07" * 32, None])
def test_client_refuses_an_impostor_that_cannot_prove_the_key(node_key: bytes | None) -> None:
    """An impostor node that says it needs a key (but holds another, or none) and waves the client's
    proof through: its AUTH_OK proof does not check out, so the client refuses it."""
    impostor = ServerProtocol("n1", node_key or b"\x09" * 32)
    client = ClientProtocol(KEY, where="memkv node X")
    client.on_hello(*parse(impostor.hello()))
    forged = encode(AuthOk(proof=b"\x00" * 32 if node_key is None else b"x" * 32), 0)
    with pytest.raises(AuthError, match="could not prove the auth key"):
        client.on_auth_reply(*parse(forged))
    assert client.state is ConnState.CLOSED


def test_proofs_are_bound_to_both_nonces_and_the_node() -> None:
    """A client proof captured on one connection (or for another node) is useless on another."""
    server1, server2 = ServerProtocol("n1", KEY), ServerProtocol("n1", KEY)
    captured = ClientProtocol(KEY).on_hello(*parse(server1.hello()))
    with pytest.raises(ProtocolError) as info:
        server2.on_auth(*parse(captured))  # replayed against another connection's nonce
    assert info.value.code == ErrorCode.AUTH_FAILED
    # Same nonce, other node id: a proof made for node n2 does not open node n1.
    fixed = lambda n: b"\x05" * n  # noqa: E731
    for_n2 = ClientProtocol(KEY).on_hello(*parse(ServerProtocol("n2", KEY, random=fixed).hello()))
    with pytest.raises(ProtocolError) as info:
        ServerProtocol("n1", KEY, random=fixed).on_auth(*parse(for_n2))
    assert info.value.code == ErrorCode.AUTH_FAILED


def test_nonce_is_fresh_per_connection() -> None:
    a, b = parse(ServerProtocol("n", KEY).hello())[1], parse(ServerProtocol("n", KEY).hello())[1]
    assert a != b


def test_wrong_key_is_refused_by_the_node_and_reported_by_the_client() -> None:
    server = ServerProtocol("n1", KEY)
    client = ClientProtocol(b"\x01" * 32, where="memkv node X")
    auth = client.on_hello(*parse(server.hello()))
    with pytest.raises(ProtocolError) as info:
        server.on_auth(*parse(auth))
    assert info.value.code == ErrorCode.AUTH_FAILED
    refusal = encode(ErrorFrame(code=info.value.code, message=str(info.value)), 0)
    with pytest.raises(AuthError, match=r"memkv node X rejected our credentials .*authentication failed"):
        client.on_auth_reply(*parse(refusal))
    assert server.state is ConnState.HANDSHAKE  # nothing was unlocked


def test_missing_key_still_answers_so_the_node_can_count_it() -> None:
    server = ServerProtocol("n1", KEY)
    client = ClientProtocol(None, where="memkv node X")
    auth = client.on_hello(*parse(server.hello()))  # an empty proof, not silence
    with pytest.raises(ProtocolError) as info:
        server.on_auth(*parse(auth))
    assert info.value.code == ErrorCode.AUTH_REQUIRED
    refusal = encode(ErrorFrame(code=info.value.code, message=str(info.value)), 0)
    with pytest.raises(AuthError, match="requires an auth key: set MEMKV_AUTH_KEY"):
        client.on_auth_reply(*parse(refusal))
    assert client.state is ConnState.CLOSED


def test_server_refuses_requests_before_auth_and_non_requests_after() -> None:
    server = ServerProtocol("n1", None)
    ping = parse(encode(PingRequest(), 1))[0]
    with pytest.raises(ProtocolError) as info:
        server.check_request(ping)
    assert info.value.code == ErrorCode.AUTH_REQUIRED
    with pytest.raises(ProtocolError) as info:
        server.on_auth(*parse(encode(PingRequest(), 1)))  # the first frame must be AUTH
    assert info.value.code == ErrorCode.AUTH_REQUIRED
    handshake(server, ClientProtocol(None))
    server.check_request(ping)
    with pytest.raises(ProtocolError):
        server.check_request(parse(encode(PingResponse(), 1))[0])
    with pytest.raises(ProtocolError):
        server.on_auth(*parse(ClientProtocol(None).on_hello(*parse(server.hello()))))  # AUTH twice


def test_client_expects_hello_first() -> None:
    client = ClientProtocol(None, where="memkv node X")
    with pytest.raises(ProtocolError, match="expected HELLO"):
        client.on_hello(*parse(encode(PingResponse(), 0)))
    with pytest.raises(ServerError, match="refused the connection: busy"):
        client.on_hello(*parse(encode(ErrorFrame(code=ErrorCode.SHUTTING_DOWN, message="busy"), 0)))


def ready_client() -> ClientProtocol:
    client = ClientProtocol(None, where="memkv node X")
    handshake(ServerProtocol("n", None), client)
    return client


def test_request_ids_are_unique_and_matched() -> None:
    client = ready_client()
    with pytest.raises(ProtocolError, match="not ready"):
        ClientProtocol(None).request(PingRequest())
    r1, f1 = client.request(PingRequest())
    r2, _ = client.request(PutRequest(keys=[b"k"], sizes=[3], versions=[1]))
    assert r1 != r2 and parse(f1)[0].request_id == r1
    assert client.pending == {r1: Op.PING, r2: Op.PUT}
    # Answers may come for either pending id; each is matched once.
    assert client.on_response(*parse(encode(PutResponse(statuses=[Status.OK]), r2))) == PutResponse([Status.OK])
    with pytest.raises(ProtocolError, match="unknown request id"):
        client.on_response(*parse(encode(PutResponse(statuses=[Status.OK]), r2)))
    with pytest.raises(ProtocolError, match="does not answer PING"):
        client.on_response(*parse(encode(ExistsResponse(statuses=[], lengths=[], versions=[], lease_ids=[]), r1)))


def test_request_ids_wrap_and_skip_zero() -> None:
    client = ready_client()
    client._next_id = MAX_REQUEST_ID
    assert client.request(PingRequest())[0] == MAX_REQUEST_ID
    assert client.request(PingRequest())[0] == 1


def test_unencodable_request_leaves_nothing_pending() -> None:
    client = ready_client()
    with pytest.raises(ValueError):
        client.request(PingRequest(data=b"x" * 70000))
    assert client.pending == {}
    rid, _ = client.request(PingRequest())
    assert rid == 1


def test_error_frame_closes_the_client_side() -> None:
    client = ready_client()
    _rid, _ = client.request(PingRequest())
    with pytest.raises(ServerError, match="closed the connection: bye") as info:
        client.on_response(*parse(encode(ErrorFrame(code=ErrorCode.SHUTTING_DOWN, message="bye"), 0)))
    assert info.value.code == ErrorCode.SHUTTING_DOWN
    assert client.state is ConnState.CLOSED
