"""Message codec: every message type round-trips; random or mutated meta only ever raises ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, MAX_KEY_LEN, NONCE_LEN, RESPONSE_BIT, ErrorCode, Op, Status
from lmcache_memkv.wire.frames import HEADER_LEN, MAX_REQUEST_ID, Header, decode_header
from lmcache_memkv.wire.limits import DEFAULT_LIMITS, Limits
from lmcache_memkv.wire.messages import (
    Auth,
    AuthOk,
    DeleteRequest,
    DeleteResponse,
    ErrorFrame,
    ExistsRequest,
    ExistsResponse,
    GetRequest,
    GetResponse,
    Hello,
    ListRequest,
    ListResponse,
    Message,
    PingRequest,
    PingResponse,
    PutRequest,
    PutResponse,
    RdmaGetRequest,
    RdmaGetResponse,
    RdmaPutRequest,
    RdmaPutResponse,
    ReleaseRequest,
    ReleaseResponse,
    StatsRequest,
    StatsResponse,
    StatusResponse,
    decode,
    encode,
)

L = DEFAULT_LIMITS
keys = st.binary(min_size=1, max_size=MAX_KEY_LEN)
key_lists = st.lists(keys, max_size=20)
sizes = st.integers(0, L.max_value_len)
u64 = st.integers(0, 2**64 - 1)
statuses = st.sampled_from(list(Status))
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=60)


@st.composite
def sized(draw: st.DrawFn, value: st.SearchStrategy[int] = sizes) -> tuple[list[bytes], list[int]]:
    ks = draw(key_lists)
    return ks, [draw(value) for _ in ks]


@st.composite
def versioned(draw: st.DrawFn) -> tuple[list[bytes], list[int], list[int]]:
    ks, ns = draw(sized())
    return ks, ns, [draw(u64) for _ in ks]


@st.composite
def records(draw: st.DrawFn, extra: int) -> tuple[list[Status], list[int], list[list[int]]]:
    """Per-key status, length and ``extra`` more u64 fields (version, lease id)."""
    ss = draw(st.lists(statuses, max_size=20))
    return ss, [draw(sizes) for _ in ss], [[draw(u64) for _ in ss] for _ in range(extra)]


MESSAGES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(Hello, node_id=text, auth_required=st.booleans(),
                     nonce=st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN), max_batch=st.integers(0, 2**32 - 1),
                     max_value_len=u64, max_payload_len=u64, max_meta_len=st.integers(0, 2**32 - 1)),
    Auth: st.builds(Auth, client_nonce=st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN),
                    client_id=st.binary(min_size=CLIENT_ID_LEN, max_size=CLIENT_ID_LEN), proof=st.binary(max_size=255)),
    AuthOk: st.builds(AuthOk, proof=st.binary(max_size=255)),
    PutRequest: versioned().map(lambda t: PutRequest(keys=t[0], sizes=t[1], versions=t[2])),
    # Capacities are buffer sizes, any u64: a big buffer is not a big value.
    GetRequest: st.builds(lambda t, exact: GetRequest(keys=t[0], capacities=t[1], exact=exact),
                          sized(u64), st.booleans()),
    ExistsRequest: st.builds(ExistsRequest, keys=key_lists, lease_ttl_ms=st.integers(0, 2**32 - 1)),
    ReleaseRequest: st.builds(ReleaseRequest, lease_ids=st.lists(u64, max_size=20)),
    DeleteRequest: sized(u64).map(lambda t: DeleteRequest(keys=t[0], versions=t[1])),
    ListRequest: st.builds(ListRequest, prefix=st.binary(max_size=MAX_KEY_LEN), cursor=st.binary(max_size=MAX_KEY_LEN),
                           limit=st.integers(1, L.max_list_limit)),
    PingRequest: st.builds(PingRequest, data=st.binary(max_size=2000)),
    StatsRequest: st.just(StatsRequest()),
    PutResponse: st.builds(PutResponse, statuses=st.lists(statuses, max_size=20)),
    ReleaseResponse: st.builds(ReleaseResponse, statuses=st.lists(statuses, max_size=20)),
    DeleteResponse: st.builds(DeleteResponse, statuses=st.lists(statuses, max_size=20)),
    GetResponse: records(1).map(lambda t: GetResponse(statuses=t[0], lengths=t[1], versions=t[2][0])),
    ExistsResponse: records(2).map(
        lambda t: ExistsResponse(statuses=t[0], lengths=t[1], versions=t[2][0], lease_ids=t[2][1])
    ),
    ListResponse: st.builds(lambda t, c: ListResponse(keys=t[0], sizes=t[1], next_cursor=c),
                            sized(), st.binary(max_size=MAX_KEY_LEN)),
    PingResponse: st.builds(PingResponse, data=st.binary(max_size=2000)),
    StatsResponse: st.builds(StatsResponse, body=st.binary(max_size=2000)),
    ErrorFrame: st.builds(ErrorFrame, code=st.sampled_from(list(ErrorCode)), message=text),
    RdmaPutRequest: versioned().flatmap(
        lambda t: st.builds(lambda s, a, r: RdmaPutRequest(session=s, keys=t[0], sizes=t[1], versions=t[2], addrs=a, rkeys=r),
                            u64, st.lists(u64, min_size=len(t[0]), max_size=len(t[0])),
                            st.lists(st.integers(0, 2**32 - 1), min_size=len(t[0]), max_size=len(t[0])))
    ),
    RdmaGetRequest: sized(u64).flatmap(
        lambda t: st.builds(lambda s, a, r, x: RdmaGetRequest(session=s, keys=t[0], capacities=t[1], addrs=a, rkeys=r, exact=x),
                            u64, st.lists(u64, min_size=len(t[0]), max_size=len(t[0])),
                            st.lists(st.integers(0, 2**32 - 1), min_size=len(t[0]), max_size=len(t[0])), st.booleans())
    ),
    RdmaPutResponse: st.builds(RdmaPutResponse, statuses=st.lists(statuses, max_size=20)),
    RdmaGetResponse: records(1).map(lambda t: RdmaGetResponse(statuses=t[0], lengths=t[1], versions=t[2][0])),
}
any_message = st.one_of(*MESSAGES.values())
# Every opcode either way round, plus every other byte value: decode must cope with any header.
any_op = st.one_of(st.sampled_from([op | bit for op in Op for bit in (0, RESPONSE_BIT)]), st.integers(0, 255))


# Decoding headers for round trips: a frame's payload may add up past one node's default cap.
WIDE = Limits(max_payload_len=1 << 42)


def _split(frame: bytes, limits: Limits = WIDE) -> tuple[Header, bytes]:
    header = decode_header(frame[:HEADER_LEN], limits)
    return header, frame[HEADER_LEN:]


def test_every_concrete_message_type_has_a_strategy() -> None:
    def every(cls: type[Message]) -> set[type[Message]]:
        subs = set(cls.__subclasses__())
        return set().union(*(every(s) for s in subs)) | subs

    assert every(Message) - {StatusResponse} == set(MESSAGES)  # StatusResponse: a base only


@given(msg=any_message, rid=st.integers(0, MAX_REQUEST_ID))
def test_round_trip(msg: Message, rid: int) -> None:
    header, meta = _split(encode(msg, rid))
    assert header.request_id == rid
    assert header.base_op is msg.op and header.is_response == msg.response
    assert header.meta_len == len(meta) and header.payload_len == msg.payload_len()
    assert decode(header, meta, L) == msg
    assert decode(header, memoryview(meta), L) == msg


@given(op=any_op, meta=st.binary(max_size=300), payload_len=st.integers(0, 2**64 - 1))
def test_random_meta_with_any_op_only_raises_protocol_error(op: int, meta: bytes, payload_len: int) -> None:
    header = Header(op=op, request_id=7, meta_len=len(meta), payload_len=payload_len)
    try:
        decode(header, meta, L)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


@given(msg=any_message, data=st.data())
def test_mutated_frames_only_raise_protocol_error(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg, 1))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if kind == "flip" and frame:
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del frame[data.draw(st.integers(0, len(frame))):]
        else:
            frame += data.draw(st.binary(min_size=1, max_size=8))
    try:
        header = decode_header(bytes(frame[:HEADER_LEN]), L)
        decode(header, bytes(frame[HEADER_LEN : HEADER_LEN + header.meta_len]), L)
    except ProtocolError:
        pass


@given(meta=st.binary(max_size=64))
def test_meta_length_must_match_header(meta: bytes) -> None:
    header = Header(op=Op.PING, request_id=1, meta_len=len(meta) + 1, payload_len=0)
    with pytest.raises(ProtocolError, match="header says"):
        decode(header, meta, L)


def _reject(msg: Message, code: ErrorCode, limits: Limits = L, payload_len: int | None = None) -> str:
    header, meta = _split(
        encode(msg, 1), Limits(max_meta_len=1 << 30, max_batch=1 << 20, max_value_len=1 << 40, max_payload_len=1 << 42)
    )
    if payload_len is not None:
        header = Header(header.op, header.request_id, header.meta_len, payload_len)
    with pytest.raises(ProtocolError) as info:
        decode(header, meta, limits)
    assert info.value.code == code, info.value
    return str(info.value)


def test_limits_on_keys_batches_and_values() -> None:
    small = Limits(max_batch=4, max_value_len=100, max_key_len=16, max_list_limit=10)
    assert "key of 17 bytes" in _reject(ExistsRequest(keys=[b"k" * 17]), ErrorCode.LIMIT, small)
    assert "key of 513 bytes" in _reject(DeleteRequest(keys=[b"k" * 513], versions=[1]), ErrorCode.LIMIT)
    assert "batch of 5" in _reject(ReleaseRequest(lease_ids=[1] * 5), ErrorCode.LIMIT, small)
    assert "value of 101" in _reject(PutRequest(keys=[b"k"], sizes=[101], versions=[1]), ErrorCode.LIMIT, small)
    assert "list limit 11" in _reject(ListRequest(limit=11), ErrorCode.LIMIT, small)
    assert "empty key" in _reject(PutRequest(keys=[b""], sizes=[0], versions=[1]), ErrorCode.BAD_FRAME)
    assert "prefix" in _reject(ListRequest(prefix=b"p" * 17, limit=5), ErrorCode.LIMIT, small)
    # A big read buffer is fine: its capacity is a bound, not a value.
    header, meta = _split(encode(GetRequest(keys=[b"k"], capacities=[1 << 40]), 1))
    assert decode(header, meta, small) == GetRequest(keys=[b"k"], capacities=[1 << 40])


def test_payload_must_add_up() -> None:
    put = PutRequest(keys=[b"a", b"b"], sizes=[3, 4], versions=[1, 2])
    assert "does not match" in _reject(put, ErrorCode.BAD_FRAME, payload_len=8)
    assert "does not match" in _reject(
        GetResponse(statuses=[Status.OK, Status.MISS], lengths=[5, 9], versions=[1, 0]), ErrorCode.BAD_FRAME, payload_len=14
    )


def test_get_response_payload_counts_only_hits() -> None:
    reply = GetResponse(statuses=[Status.OK, Status.MISS, Status.OK, Status.WRONG_SIZE], lengths=[5, 0, 7, 9], versions=[1, 0, 2, 3])
    assert reply.payload_len() == 12


def test_unknown_get_flags_are_rejected() -> None:
    header, meta = _split(encode(GetRequest(keys=[b"k"], capacities=[1], exact=True), 1))
    assert "flags" in _reject_raw(header, b"\x02" + meta[1:])


def test_unknown_status_is_rejected() -> None:
    header, meta = _split(encode(PutResponse(statuses=[Status.OK]), 1))
    assert "status" in _reject_raw(header, meta[:-1] + b"\x63")


def _reject_raw(header: Header, meta: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(header, meta, L)
    return str(info.value)


def test_encode_refuses_out_of_range_fields_with_value_error() -> None:
    with pytest.raises(ValueError, match="16-bit"):
        encode(PingRequest(data=b"x" * 70000), 1)
    with pytest.raises(ValueError, match="Auth"):
        encode(Auth(proof=b"x" * 256), 1)
    with pytest.raises(ValueError, match="client nonce"):
        encode(Auth(client_nonce=b"short"), 1)
    with pytest.raises(ValueError, match="ExistsRequest"):
        encode(ExistsRequest(keys=[b"k"], lease_ttl_ms=2**32), 1)
    with pytest.raises(ValueError, match="request id"):
        encode(PingRequest(), MAX_REQUEST_ID + 1)
    with pytest.raises(ValueError):
        encode(PutRequest(keys=[b"k"], sizes=[], versions=[1]), 1)
    with pytest.raises(ValueError):
        encode(PutRequest(keys=[b"k"], sizes=[1], versions=[]), 1)


def test_long_error_message_is_cut_at_a_character_boundary() -> None:
    header, meta = _split(encode(ErrorFrame(code=ErrorCode.LIMIT, message="é" * 5000), 3))
    msg = decode(header, meta, L)
    assert isinstance(msg, ErrorFrame)
    assert msg.message == "é" * 2048
