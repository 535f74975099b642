"""Opcodes, status and error codes, and fixed limits of the wire protocol."""

from __future__ import annotations

import enum

MAGIC = b"MK"
VERSION = 1
MAX_KEY_LEN = 512  # protocol cap; longer LMCache keys are digested by the adapter
NONCE_LEN = 32
RESPONSE_BIT = 0x80


class Op(enum.IntEnum):
    HELLO = 0x01  # node -> client, first frame on every connection
    AUTH = 0x02  # client -> node, the challenge answer
    AUTH_OK = 0x03  # node -> client
    PUT = 0x10
    GET = 0x11
    EXISTS = 0x12
    RELEASE = 0x13
    DELETE = 0x14
    LIST = 0x15
    PING = 0x16
    STATS = 0x17
    ERROR = 0x7F


REQUEST_OPS = frozenset({Op.PUT, Op.GET, Op.EXISTS, Op.RELEASE, Op.DELETE, Op.LIST, Op.PING, Op.STATS})


class Status(enum.IntEnum):
    """Per-key outcome inside a batch response."""

    OK = 0
    MISS = 1
    NO_SPACE = 2  # nothing evictable could make room
    TOO_LARGE = 3  # value over the node's max value size
    NOT_LEASED = 4  # RELEASE of a key holding no lease


class ErrorCode(enum.IntEnum):
    """Connection-level errors; the node closes the connection after sending one."""

    BAD_FRAME = 1
    BAD_VERSION = 2
    UNKNOWN_OP = 3
    LIMIT = 4
    AUTH_REQUIRED = 5
    AUTH_FAILED = 6
    TIMEOUT = 7
    INTERNAL = 8
    SHUTTING_DOWN = 9
