"""The fixed frame header: magic, version, opcode, request id, meta and payload lengths.

A frame is ``header | meta | payload``. ``meta`` is a small binary description of the
batch (keys, sizes, statuses); ``payload`` is raw value bytes, moved without copies by
the transport. The header says how long each part is, so a reader can check limits
before it allocates or reads anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lmcache_memkv.errors import ProtocolError
from lmcache_memkv.wire.constants import MAGIC, REQUEST_OPS, RESPONSE_BIT, VERSION, ErrorCode, Op
from lmcache_memkv.wire.limits import Limits

_HEADER = struct.Struct("!2sBBIIQ")
HEADER_LEN = _HEADER.size  # 20
MAX_REQUEST_ID = 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    op: int  # an Op, with RESPONSE_BIT set on responses
    request_id: int
    meta_len: int
    payload_len: int

    @property
    def base_op(self) -> Op:
        return base_opcode(self.op)

    @property
    def is_response(self) -> bool:
        return bool(self.op & RESPONSE_BIT)


def base_opcode(op: int) -> Op:
    """The opcode without the response bit; anything unknown is a ProtocolError, never a ValueError."""
    try:
        return Op(op & ~RESPONSE_BIT)
    except ValueError:
        raise ProtocolError(f"unknown opcode 0x{op:02x}", ErrorCode.UNKNOWN_OP) from None


def encode_header(header: Header) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, header.op, header.request_id, header.meta_len, header.payload_len)


def decode_header(data: bytes | bytearray | memoryview, limits: Limits) -> Header:
    """Parse and validate a header; raise ProtocolError on anything off."""
    if len(data) != HEADER_LEN:
        raise ProtocolError(f"frame header must be {HEADER_LEN} bytes, got {len(data)}", ErrorCode.BAD_FRAME)
    magic, version, op, request_id, meta_len, payload_len = _HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (not a MemKV peer?)", ErrorCode.BAD_FRAME)
    if version != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version} (this side speaks {VERSION})", ErrorCode.BAD_VERSION
        )
    bop = base_opcode(op)
    if op & RESPONSE_BIT and bop not in REQUEST_OPS:
        raise ProtocolError(f"unknown opcode 0x{op:02x}", ErrorCode.UNKNOWN_OP)
    if meta_len > limits.max_meta_len:
        raise ProtocolError(
            f"frame meta of {meta_len} bytes exceeds the limit of {limits.max_meta_len}", ErrorCode.LIMIT
        )
    if payload_len > limits.max_payload_len:
        raise ProtocolError(
            f"frame payload of {payload_len} bytes exceeds the limit of {limits.max_payload_len}", ErrorCode.LIMIT
        )
    if payload_len and bop not in (Op.PUT, Op.GET):
        raise ProtocolError(f"opcode {bop.name} carries no payload, got {payload_len} bytes", ErrorCode.BAD_FRAME)
    return Header(op=op, request_id=request_id, meta_len=meta_len, payload_len=payload_len)

