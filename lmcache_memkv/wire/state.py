"""Connection state machines for both ends of a data-plane connection (no I/O).

Every connection opens with the node's HELLO (its nonce and limits) and the client's AUTH (the
client's nonce, its id and its proof); the node answers AUTH_OK carrying its own proof. With a
key configured both sides prove it, over both nonces and the node's id, so neither a keyless
client nor an impostor node gets through, and a client holding a key never accepts a node that
says no key is needed (no downgrade). Only after AUTH_OK may requests flow; each request
carries an id, several may be in flight, and each response must answer an id still pending.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable

from lmcache_memkv import auth
from lmcache_memkv.errors import AuthError, ProtocolError, ServerError
from lmcache_memkv.wire.constants import CLIENT_ID_LEN, NONCE_LEN, REQUEST_OPS, ErrorCode, Op
from lmcache_memkv.wire.frames import MAX_REQUEST_ID, Header
from lmcache_memkv.wire.limits import DEFAULT_LIMITS, Limits
from lmcache_memkv.wire.messages import Auth, AuthOk, ErrorFrame, Hello, Message, encode

MAX_AUTH_META = 256  # before AUTH a node reads no more meta than an AUTH frame needs


class ConnState(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


class ServerProtocol:
    """The node's side of one connection."""

    def __init__(
        self,
        node_id: str,
        key: bytes | None,
        limits: Limits = DEFAULT_LIMITS,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_id = node_id
        self._key = key
        self._limits = limits
        self._nonce = random(NONCE_LEN)
        self.state = ConnState.HANDSHAKE
        self.client_id = b""

    def hello(self) -> bytes:
        lim = self._limits
        msg = Hello(
            node_id=self.node_id,
            auth_required=self._key is not None,
            nonce=self._nonce,
            max_batch=lim.max_batch,
            max_value_len=lim.max_value_len,
            max_payload_len=lim.max_payload_len,
            max_meta_len=lim.max_meta_len,
        )
        return encode(msg, 0)

    def on_auth(self, header: Header, msg: Message) -> bytes:
        """Check the client's AUTH; return AUTH_OK, or raise ProtocolError (send it, then close)."""
        if self.state is not ConnState.HANDSHAKE or not isinstance(msg, Auth) or header.is_response:
            raise ProtocolError("expected AUTH as the first frame", ErrorCode.AUTH_REQUIRED)
        proof = b""
        if self._key is not None:
            if not msg.proof:
                raise ProtocolError(
                    "this node requires an auth key; set MEMKV_AUTH_KEY on the client", ErrorCode.AUTH_REQUIRED
                )
            expected = auth.data_client_proof(self._key, self._nonce, msg.client_nonce, self.node_id)
            if not auth.verify(expected, msg.proof):
                raise ProtocolError("authentication failed: wrong auth key", ErrorCode.AUTH_FAILED)
            proof = auth.data_node_proof(self._key, self._nonce, msg.client_nonce, self.node_id)
        self.client_id = msg.client_id
        self.state = ConnState.READY
        return encode(AuthOk(proof=proof), header.request_id)

    def check_request(self, header: Header) -> None:
        """A request is only valid on a READY connection and only with a request opcode."""
        if self.state is not ConnState.READY:
            raise ProtocolError("request before authentication", ErrorCode.AUTH_REQUIRED)
        if header.is_response or header.base_op not in REQUEST_OPS:
            raise ProtocolError(f"opcode 0x{header.op:02x} is not a request", ErrorCode.UNKNOWN_OP)

    def close(self) -> None:
        self.state = ConnState.CLOSED


class ClientProtocol:
    """The client's side of one connection."""

    def __init__(
        self,
        key: bytes | None,
        where: str = "node",
        client_id: bytes | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._key = key
        self._where = where
        self._random = random
        self.client_id = client_id if client_id is not None else random(CLIENT_ID_LEN)
        if len(self.client_id) != CLIENT_ID_LEN:
            raise ValueError(f"client id must be {CLIENT_ID_LEN} bytes")
        self._next_id = 1
        self.pending: dict[int, Op] = {}
        self.state = ConnState.HANDSHAKE
        self.node_id = ""
        self.hello: Hello | None = None
        self._node_nonce = b""
        self._client_nonce = b""
        self._missing_key = False

    def on_hello(self, header: Header, msg: Message) -> bytes:
        if isinstance(msg, ErrorFrame):
            raise ServerError(f"{self._where} refused the connection: {msg.message}", msg.code)
        if not isinstance(msg, Hello) or header.is_response:
            raise ProtocolError(f"{self._where}: expected HELLO, got opcode 0x{header.op:02x}")
        if self._key is not None and not msg.auth_required:
            # A node that cannot prove the key is not one of ours: no downgrade to "no auth".
            self.state = ConnState.CLOSED
            raise AuthError(
                f"{self._where} says it needs no auth key, but this client has one: refusing a node "
                "that cannot prove the key (an impostor, or a node started without MEMKV_AUTH_KEY)"
            )
        self.node_id = msg.node_id
        self.hello = msg
        self._node_nonce = msg.nonce
        self._client_nonce = self._random(NONCE_LEN)
        # Without a key we still answer (with an empty proof) so the node can log and count
        # the refused client; on_auth_reply then raises AuthError.
        self._missing_key = msg.auth_required and self._key is None
        proof = b""
        if self._key is not None:
            proof = auth.data_client_proof(self._key, msg.nonce, self._client_nonce, msg.node_id)
        return encode(Auth(client_nonce=self._client_nonce, client_id=self.client_id, proof=proof), 0)

    def on_auth_reply(self, header: Header, msg: Message) -> None:
        if self._missing_key:
            self.state = ConnState.CLOSED
            raise AuthError(f"{self._where} requires an auth key: set MEMKV_AUTH_KEY (64 hex characters)")
        if isinstance(msg, ErrorFrame):
            self.state = ConnState.CLOSED
            if msg.code in (ErrorCode.AUTH_FAILED, ErrorCode.AUTH_REQUIRED):
                raise AuthError(f"{self._where} rejected our credentials (is MEMKV_AUTH_KEY the cluster's key?): {msg.message}")
            raise ServerError(f"{self._where}: {msg.message}", msg.code)
        if not isinstance(msg, AuthOk):
            raise ProtocolError(f"{self._where}: expected AUTH_OK, got opcode 0x{header.op:02x}")
        if self._key is not None:
            expected = auth.data_node_proof(self._key, self._node_nonce, self._client_nonce, self.node_id)
            if not auth.verify(expected, msg.proof):
                self.state = ConnState.CLOSED
                raise AuthError(f"{self._where} could not prove the auth key: refusing it (an impostor?)")
        self.state = ConnState.READY

    def request(self, msg: Message) -> tuple[int, bytes]:
        """Assign a request id and encode the request's header and meta."""
        if self.state is not ConnState.READY:
            raise ProtocolError(f"{self._where}: connection is not ready ({self.state.value})")
        rid = self._next_id
        frame = encode(msg, rid)  # first: a request that cannot be encoded leaves no pending entry behind
        self._next_id = 1 if rid >= MAX_REQUEST_ID else rid + 1
        self.pending[rid] = msg.op
        return rid, frame

    def on_response(self, header: Header, msg: Message) -> Message:
        """Match a response to its pending request; an error frame raises ServerError."""
        if isinstance(msg, ErrorFrame):
            self.state = ConnState.CLOSED
            raise ServerError(f"{self._where} closed the connection: {msg.message}", msg.code)
        op = self.pending.pop(header.request_id, None)
        if op is None:
            raise ProtocolError(f"{self._where}: response for unknown request id {header.request_id}")
        if not header.is_response or header.base_op is not op:
            raise ProtocolError(f"{self._where}: response opcode 0x{header.op:02x} does not answer {op.name}")
        return msg
