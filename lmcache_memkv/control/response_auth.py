"""The node's proof on every answer, so a keyed caller trusts only nodes that hold the key.

``ResponseHeader.proof`` is an HMAC-SHA-256 over: a context string (distinct from request
proofs, so neither can stand in for the other), the full method name, the SHA-256 of the
request bytes the node answered, the message's index in its stream (0 for unary calls) and the
whole response serialised with ``proof`` empty. Every request a client sends carries a random
``nonce``, so an answer is good for one request only and cannot be replayed to a later one. A
keyed caller refuses an answer without a proof (a keyless node: no downgrade) or with a wrong one.

The caller verifies over its own re-serialisation of the parsed answer, which equals the node's
bytes as long as both run the same .proto (fields added later must take higher numbers, which
protobuf then writes last, as the parser keeps unknown fields).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from google.protobuf.message import Message

from lmcache_memkv.control.auth import body_digest, frame

_CONTEXT = b"memkv-control-reply-v1"
NONCE_BYTES = 16

# Full gRPC method names, as the node's interceptor sees them.
MEMBER_LIST = "/memkv.v1.Cluster/MemberList"
JOIN = "/memkv.v1.Cluster/Join"
LEAVE = "/memkv.v1.Cluster/Leave"
HEARTBEAT = "/memkv.v1.Cluster/Heartbeat"
PING = "/memkv.v1.Cluster/Ping"
PING_REQ = "/memkv.v1.Cluster/PingReq"
WATCH = "/memkv.v1.Cluster/Watch"
STATUS = "/memkv.v1.Maintenance/Status"
CLUSTER_STATS = "/memkv.v1.Maintenance/ClusterStats"
HELLO = "/memkv.v1.Session/Hello"


class ReplyRefused(ValueError):
    """An answer that does not prove the caller's key: the node has none, or another one."""


def fresh_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _mac(key: bytes, method: str, request_digest: bytes, index: int, unsigned: bytes) -> bytes:
    msg = frame(_CONTEXT, method.encode(), request_digest, index.to_bytes(8, "big"), unsigned)
    return hmac.new(key, msg, hashlib.sha256).digest()


def _has_header(reply: Message) -> bool:
    return "header" in reply.DESCRIPTOR.fields_by_name


def sign_reply(key: bytes, method: str, request_digest: bytes, reply: Message, index: int = 0) -> None:
    """Set ``reply.header.proof`` (every response of this API has a header)."""
    if not _has_header(reply):
        return
    header = reply.header
    header.proof = b""
    header.proof = _mac(key, method, request_digest, index, reply.SerializeToString())


def check_reply(key: bytes | None, method: str, request: Message, reply: Message, index: int = 0) -> None:
    """Return if ``reply`` answers ``request`` from a node holding ``key`` (any reply without a
    key); else raise ReplyRefused."""
    if key is None:
        return
    short = method.rsplit("/", 1)[-1]
    if not _has_header(reply) or not reply.HasField("header") or not reply.header.proof:
        raise ReplyRefused(f"{short}: the node's answer carries no proof of the auth key (a node without the key?)")
    proof = bytes(reply.header.proof)
    unsigned = type(reply)()
    unsigned.CopyFrom(reply)
    unsigned.header.proof = b""
    expected = _mac(key, method, body_digest(request.SerializeToString()), index, unsigned.SerializeToString())
    if not hmac.compare_digest(expected, proof):
        raise ReplyRefused(f"{short}: the node's answer does not prove this auth key (a node with another key?)")
