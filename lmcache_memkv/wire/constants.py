"""Opcodes, status and error codes, and fixed limits of the wire protocol."""

from __future__ import annotations

import enum

MAGIC = b"MK"
VERSION = 2  # v2: versioned values, lease ids, mutual auth, limits in HELLO
MAX_KEY_LEN = 512  # protocol cap; longer LMCache keys are digested by the adapter
NONCE_LEN = 32
CLIENT_ID_LEN = 16  # random per client: owns its leases and its lease budget
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
    # RDMA forms of PUT and GET: the request names, per value, the client's registered page
    # (address and rkey); the node moves the bytes with verbs, so no value bytes ride the frame.
    RPUT = 0x18
    RGET = 0x19
    ERROR = 0x7F


REQUEST_OPS = frozenset(
    {Op.PUT, Op.GET, Op.EXISTS, Op.RELEASE, Op.DELETE, Op.LIST, Op.PING, Op.STATS, Op.RPUT, Op.RGET}
)
MAX_RKEY = 0xFFFFFFFF  # verbs rkeys are 32 bits


class Status(enum.IntEnum):
    """Per-key outcome inside a batch response."""

    OK = 0
    MISS = 1
    NO_SPACE = 2  # nothing evictable could make room
    TOO_LARGE = 3  # value over the node's max value size
    NOT_LEASED = 4  # RELEASE of a lease id this client does not hold (released, expired, never granted)
    STALE = 5  # PUT/DELETE older than what the node holds for the key (a newer value or a delete)
    WRONG_SIZE = 6  # exact-size GET: the stored value's length differs from the buffer (nothing sent)
    LEASE_LIMIT = 7  # EXISTS found the key but this client's lease budget is spent: not leased
    NOT_READY = 8  # PUT refused until every peer knows this node's current data life (after a start or wipe)


# PUT statuses after which the node holds no value of the key older than the PUT's version:
# the node invalidated it, so the replica counts as consistent with the write.
INVALIDATING = frozenset({Status.NO_SPACE, Status.TOO_LARGE, Status.NOT_READY})


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
    FENCED = 10  # the node dropped its data (it may have been declared DEAD); reconnect
    BUSY = 11  # connection budget spent; try later
    NO_SESSION = 12  # RPUT/RGET names no live RDMA session of this client: set up a new one (Session.Hello)
