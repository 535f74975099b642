"""Frame header codec: round trips, every rejection, and fuzzing (only ProtocolError may escape)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import MAGIC, REQUEST_OPS, RESPONSE_BIT, VERSION, ErrorCode, Op
from lmcache_memkv.wire.frames import HEADER_LEN, MAX_REQUEST_ID, Header, base_opcode, decode_header, encode_header
from lmcache_memkv.wire.limits import DEFAULT_LIMITS, Limits

_RAW = struct.Struct("!2sBBIIQ")
_NON_REQUEST = sorted(set(Op) - REQUEST_OPS)


def _ops() -> st.SearchStrategy[int]:
    requests = st.sampled_from(sorted(REQUEST_OPS)).flatmap(lambda op: st.sampled_from([op, op | RESPONSE_BIT]))
    return st.one_of(requests, st.sampled_from(_NON_REQUEST))


@given(op=_ops(), rid=st.integers(0, MAX_REQUEST_ID), meta_len=st.integers(0, DEFAULT_LIMITS.max_meta_len))
def test_header_round_trip(op: int, rid: int, meta_len: int) -> None:
    payload = 12345 if (op & ~RESPONSE_BIT) in (Op.PUT, Op.GET) else 0
    header = Header(op=op, request_id=rid, meta_len=meta_len, payload_len=payload)
    data = encode_header(header)
    assert len(data) == HEADER_LEN
    assert decode_header(data, DEFAULT_LIMITS) == header
    assert decode_header(memoryview(data), DEFAULT_LIMITS) == header
    assert decode_header(bytearray(data), DEFAULT_LIMITS) == header


@given(st.binary(max_size=3 * HEADER_LEN))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        header = decode_header(data, DEFAULT_LIMITS)
    except ProtocolError:
        return
    assert len(data) == HEADER_LEN and header.base_op in Op


@given(st.binary(min_size=HEADER_LEN - 4, max_size=HEADER_LEN - 4), st.integers(0, 255), st.integers(0, 255))
def test_random_headers_with_valid_magic_only_raise_protocol_error(rest: bytes, version: int, op: int) -> None:
    data = MAGIC + bytes([version, op]) + rest[2:] + rest[:2]
    try:
        decode_header(data, DEFAULT_LIMITS)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


def _bad(data: bytes, code: ErrorCode, limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_header(data, limits)
    assert info.value.code == code, info.value
    return info.value


def test_rejects_wrong_length() -> None:
    _bad(b"MK", ErrorCode.BAD_FRAME)
    _bad(_RAW.pack(MAGIC, VERSION, Op.PING, 1, 0, 0) + b"x", ErrorCode.BAD_FRAME)


def test_rejects_bad_magic_and_version() -> None:
    assert "magic" in str(_bad(_RAW.pack(b"GE", VERSION, Op.PING, 1, 0, 0), ErrorCode.BAD_FRAME))
    assert "version 9" in str(_bad(_RAW.pack(MAGIC, 9, Op.PING, 1, 0, 0), ErrorCode.BAD_VERSION))


@pytest.mark.parametrize("op", [0x00, 0x20, 0x55, 0x7E, 0xFE, Op.HELLO | RESPONSE_BIT, Op.ERROR | RESPONSE_BIT])
def test_rejects_unknown_opcodes(op: int) -> None:
    assert f"0x{op:02x}" in str(_bad(_RAW.pack(MAGIC, VERSION, op, 1, 0, 0), ErrorCode.UNKNOWN_OP))


def test_limits_checked_before_anything_is_read() -> None:
    limits = Limits(max_meta_len=100, max_batch=2, max_value_len=1000, max_payload_len=2000)
    _bad(_RAW.pack(MAGIC, VERSION, Op.PUT, 1, 101, 0), ErrorCode.LIMIT, limits)
    _bad(_RAW.pack(MAGIC, VERSION, Op.PUT, 1, 10, 2001), ErrorCode.LIMIT, limits)
    assert decode_header(_RAW.pack(MAGIC, VERSION, Op.PUT, 1, 100, 2000), limits).payload_len == 2000


@pytest.mark.parametrize("op", [Op.EXISTS, Op.PING, Op.LIST, Op.AUTH, Op.ERROR, Op.STATS | RESPONSE_BIT])
def test_payload_only_on_put_and_get(op: int) -> None:
    _bad(_RAW.pack(MAGIC, VERSION, op, 1, 0, 1), ErrorCode.BAD_FRAME)


def test_base_opcode_never_raises_value_error() -> None:
    assert base_opcode(Op.GET | RESPONSE_BIT) is Op.GET
    with pytest.raises(ProtocolError):
        base_opcode(0x42)
    with pytest.raises(ProtocolError):
        _ = Header(op=0x42, request_id=0, meta_len=0, payload_len=0).base_op


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_key_len"):
        Limits(max_key_len=513)
    with pytest.raises(ValueError, match="max_batch"):
        Limits(max_batch=0)
