"""Proof of the shared key on every control call.

Each call carries metadata ``x-memkv-auth: v1.<unix ms>.<nonce hex>.<hmac hex>``, the HMAC
(SHA-256, the data plane's key) taken over the full method name, the timestamp and the nonce.
The node accepts a proof only within a freshness window and only once (nonces are
remembered for the window), so a captured proof neither works for another method nor twice.
A node without a key accepts every call.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

from lmcache_memkv.auth import verify

HEADER = "x-memkv-auth"
WINDOW_S = 30.0  # clock skew plus transit a proof may show
_CONTEXT = b"memkv-control-v1"
_SESSION_CONTEXT = b"memkv-session-v1"
_NONCE_BYTES = 12


def _mac(key: bytes, method: str, stamp: str, nonce: str) -> str:
    msg = b"\0".join((_CONTEXT, method.encode(), stamp.encode(), nonce.encode()))
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, now: float | None = None, nonce: bytes | None = None) -> str:
    """The metadata value proving ``key`` for one call of ``method`` (e.g. ``/memkv.v1.Cluster/Join``)."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    nonce_hex = (os.urandom(_NONCE_BYTES) if nonce is None else nonce).hex()
    return f"v1.{stamp}.{nonce_hex}.{_mac(key, method, stamp, nonce_hex)}"


def proof_metadata(key: bytes | None, method: str) -> list[tuple[str, str]]:
    return [] if key is None else [(HEADER, sign(key, method))]


def session_proof(key: bytes, client_nonce: bytes) -> bytes:
    """The node's answer to a Session.Hello nonce: proves the node holds the key too."""
    return hmac.new(key, _SESSION_CONTEXT + client_nonce, hashlib.sha256).digest()


class ProofChecker:
    """Verifies proofs for one node; remembers nonces seen within the window."""

    def __init__(self, key: bytes | None, window_s: float = WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten (unix time)
        self._lock = threading.Lock()

    def check(self, method: str, value: str | None) -> str | None:
        """None if ``value`` proves the key for ``method``; else the reason to refuse."""
        if self.key is None:
            return None
        if not value:
            return "this node requires an auth key: set MEMKV_AUTH_KEY (or --auth-key-file) on the caller"
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
            return "malformed auth proof"
        _, stamp, nonce, mac = parts
        now = self._clock()
        if abs(now - int(stamp) / 1000) > self.window_s:
            return f"auth proof is stale or from the future (more than {self.window_s:.0f}s off; check the clocks)"
        if not verify(_mac(self.key, method, stamp, nonce).encode(), mac.encode()):
            return "authentication failed: wrong auth key"
        with self._lock:
            if nonce in self._seen:
                return "auth proof replayed"
            if len(self._seen) > 4096:
                self._seen = {n: t for n, t in self._seen.items() if t > now}
            # Remember the nonce for as long as its timestamp would still pass the freshness check.
            self._seen[nonce] = int(stamp) / 1000 + self.window_s
        return None


def _deny(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the call's own shape that only aborts; it never decodes the request."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    def abort_stream(_request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield None  # pragma: no cover - abort raises

    if handler is not None and handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(abort_stream)
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a valid proof before any servicer code runs."""

    def __init__(self, checker: ProofChecker, on_failure: Callable[[str, str], None] | None = None) -> None:
        self._checker = checker
        self._on_failure = on_failure

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = str(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata or ()
        value = next((v for k, v in metadata if k == HEADER), None)
        reason = self._checker.check(method, value if isinstance(value, str) else None)
        handler = continuation(handler_call_details)
        if reason is None:
            return handler
        if self._on_failure is not None:
            self._on_failure(method, reason)
        return _deny(handler, reason)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class ClientAuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds a fresh proof to every outgoing call (unary and server-streaming)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        method = details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        metadata = [*(details.metadata or ()), (HEADER, sign(self._key, name))]
        return _CallDetails(
            name,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)
