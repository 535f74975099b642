"""RPUT/RGET frames: per-value remote address and rkey; round-trips, bounds, and TCP frames unchanged."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import MAX_KEY_LEN, MAX_RKEY, ErrorCode, Op, Status
from lmcache_memkv.wire.frames import HEADER_LEN, decode_header
from lmcache_memkv.wire.limits import DEFAULT_LIMITS, Limits
from lmcache_memkv.wire.messages import (
    GetRequest,
    Message,
    PutRequest,
    RdmaGetRequest,
    RdmaGetResponse,
    RdmaPutRequest,
    RdmaPutResponse,
    decode,
    encode,
)

L = DEFAULT_LIMITS
u64 = st.integers(0, 2**64 - 1)
rkeys = st.integers(0, MAX_RKEY)
keys = st.lists(st.binary(min_size=1, max_size=MAX_KEY_LEN), max_size=12)


def _roundtrip(msg: Message, limits: Limits = L) -> Message:
    frame = encode(msg, 7)
    header = decode_header(frame[:HEADER_LEN], limits)
    return decode(header, frame[HEADER_LEN:], limits)


@st.composite
def rput(draw: st.DrawFn) -> RdmaPutRequest:
    ks = draw(keys)
    col = lambda s: [draw(s) for _ in ks]  # noqa: E731
    return RdmaPutRequest(
        session=draw(u64), keys=ks, sizes=col(st.integers(0, L.max_value_len)), versions=col(u64), addrs=col(u64), rkeys=col(rkeys)
    )


@st.composite
def rget(draw: st.DrawFn) -> RdmaGetRequest:
    ks = draw(keys)
    col = lambda s: [draw(s) for _ in ks]  # noqa: E731
    return RdmaGetRequest(session=draw(u64), keys=ks, capacities=col(u64), addrs=col(u64), rkeys=col(rkeys), exact=draw(st.booleans()))


@given(rput())
def test_rput_roundtrips_without_payload(msg: RdmaPutRequest) -> None:
    assert _roundtrip(msg) == msg
    assert decode_header(encode(msg, 1)[:HEADER_LEN], L).payload_len == 0  # the bytes move by verbs


@given(rget())
def test_rget_roundtrips(msg: RdmaGetRequest) -> None:
    assert _roundtrip(msg) == msg


@given(st.lists(st.sampled_from(list(Status)), max_size=20), st.data())
def test_rdma_responses_roundtrip(statuses: list[Status], data: st.DataObject) -> None:
    assert _roundtrip(RdmaPutResponse(statuses=statuses)) == RdmaPutResponse(statuses=statuses)
    lengths = [data.draw(st.integers(0, L.max_value_len)) for _ in statuses]
    versions = [data.draw(u64) for _ in statuses]
    msg = RdmaGetResponse(statuses=statuses, lengths=lengths, versions=versions)
    assert _roundtrip(msg) == msg
    assert msg.payload_len() == 0  # unlike GET's answer: the values are already in the client's pages


@given(rput(), st.data())
def test_truncated_or_mutated_rdma_meta_only_raises_protocol_error(msg: RdmaPutRequest, data: st.DataObject) -> None:
    frame = bytearray(encode(msg, 3))
    meta = frame[HEADER_LEN:]
    header = decode_header(bytes(frame[:HEADER_LEN]), L)
    cut = data.draw(st.integers(0, max(0, len(meta) - 1)))
    with pytest.raises(ProtocolError):
        decode(dataclasses.replace(header, meta_len=cut), meta[:cut], L)
    if meta:
        i = data.draw(st.integers(0, len(meta) - 1))
        meta[i] ^= data.draw(st.integers(1, 255))
        try:
            decode(header, bytes(meta), L)
        except ProtocolError:
            pass


def test_rkey_and_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="32 bits"):
        encode(RdmaGetRequest(session=1, keys=[b"k"], capacities=[1], addrs=[0], rkeys=[MAX_RKEY + 1]), 1)
    # A hand-made frame with a 33-bit rkey is refused by the decoder.
    good = encode(RdmaPutRequest(session=1, keys=[b"k"], sizes=[1], versions=[1], addrs=[0], rkeys=[MAX_RKEY]), 1)
    bad = bytearray(good)
    bad[-8:] = (MAX_RKEY + 1).to_bytes(8, "big")
    header = decode_header(bytes(bad[:HEADER_LEN]), L)
    with pytest.raises(ProtocolError, match="rkey"):
        decode(header, bytes(bad[HEADER_LEN:]), L)
    # Sizes over the value limit and batches over the batch limit, before anything is allocated.
    small = Limits(max_value_len=100, max_batch=2)
    with pytest.raises(ProtocolError) as info:
        _roundtrip(RdmaPutRequest(session=1, keys=[b"k"], sizes=[101], versions=[1], addrs=[0], rkeys=[1]), small)
    assert info.value.code == ErrorCode.LIMIT
    with pytest.raises(ProtocolError) as info:
        _roundtrip(RdmaGetRequest(session=1, keys=[b"a", b"b", b"c"], capacities=[1] * 3, addrs=[0] * 3, rkeys=[1] * 3), small)
    assert info.value.code == ErrorCode.LIMIT
    flags = bytearray(encode(RdmaGetRequest(session=1, keys=[b"k"], capacities=[1], addrs=[0], rkeys=[1]), 1))
    flags[HEADER_LEN] = 2
    with pytest.raises(ProtocolError, match="flags"):
        decode(decode_header(bytes(flags[:HEADER_LEN]), L), bytes(flags[HEADER_LEN:]), L)


def test_tcp_frames_are_unchanged() -> None:
    """RPUT/RGET are new opcodes: PUT and GET keep their v2 bytes, so TCP peers are unaffected."""
    put = encode(PutRequest(keys=[b"k"], sizes=[3], versions=[5]), 1)
    assert put[3] == Op.PUT and len(put) == HEADER_LEN + 4 + 2 + 1 + 16
    get = encode(GetRequest(keys=[b"k"], capacities=[3]), 1)
    assert get[3] == Op.GET and len(get) == HEADER_LEN + 1 + 4 + 2 + 1 + 8
