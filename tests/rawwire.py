"""Raw-socket helpers for talking to a node frame by frame (bad input, pipelining)."""

from __future__ import annotations

import os
import socket
import struct

from lmcache_memkv import auth
from lmcache_memkv.wire.constants import MAGIC, VERSION, Op
from lmcache_memkv.wire.frames import HEADER_LEN, Header, decode_header
from lmcache_memkv.wire.limits import Limits
from lmcache_memkv.wire.messages import Auth, AuthOk, ErrorFrame, Hello, Message, decode, encode

LOOSE = Limits(
    max_meta_len=64 << 20, max_batch=1 << 20, max_value_len=1 << 40, max_list_limit=1 << 20, max_payload_len=1 << 42
)
_HEADER = struct.Struct("!2sBBIIQ")


def raw_header(op: int, request_id: int = 1, meta_len: int = 0, payload_len: int = 0,
               magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """Any header at all, including ones the codec would refuse to build."""
    return _HEADER.pack(magic, version, op, request_id, meta_len, payload_len)


def recv_all(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[Header, Message, bytes]:
    """One frame: header, decoded meta, and the payload bytes (tests only; small values)."""
    header = decode_header(recv_all(sock, HEADER_LEN), LOOSE)
    msg = decode(header, recv_all(sock, header.meta_len), LOOSE)
    return header, msg, recv_all(sock, header.payload_len)


def read_frame_head(sock: socket.socket) -> tuple[Header, Message, int]:
    """Header and decoded meta; the caller reads the payload (its length is returned)."""
    header = decode_header(recv_all(sock, HEADER_LEN), LOOSE)
    return header, decode(header, recv_all(sock, header.meta_len), LOOSE), header.payload_len


def auth_frame(hello: Hello, key: bytes | None, client_id: bytes | None = None) -> bytes:
    """The AUTH a well-behaved client sends in answer to ``hello``."""
    client_nonce = os.urandom(32)
    proof = auth.data_client_proof(key, hello.nonce, client_nonce, hello.node_id) if key is not None else b""
    return encode(Auth(client_nonce=client_nonce, client_id=client_id or os.urandom(16), proof=proof), 0)


def connect(
    address: tuple[str, int],
    key: bytes | None = None,
    timeout_s: float = 5.0,
    rcvbuf: int | None = None,
    client_id: bytes | None = None,
    source: str | None = None,
) -> socket.socket:
    """A raw connection past the handshake (HELLO, AUTH, AUTH_OK); ``source`` binds a local address."""
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the advertised window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(timeout_s)
    sock.connect(address)
    _, hello, _ = read_frame(sock)
    assert isinstance(hello, Hello)
    sock.sendall(auth_frame(hello, key, client_id))
    _, ok, _ = read_frame(sock)
    assert isinstance(ok, AuthOk), ok
    return sock


def expect_error(sock: socket.socket) -> ErrorFrame:
    """The node answers bad input with one error frame, then closes the connection."""
    header, msg, _ = read_frame(sock)
    assert header.op == Op.ERROR, header
    assert isinstance(msg, ErrorFrame)
    assert_closed(sock)
    return msg


def assert_closed(sock: socket.socket) -> None:
    try:
        rest = sock.recv(1 << 16)
    except ConnectionResetError:
        return
    assert rest == b"", f"connection still open, got {rest[:40]!r}"
