"""Proof of the shared key on every control call.

Each call carries metadata ``x-memkv-auth: v2.<unix ms>.<nonce hex>.<target hex>.<hmac hex>``:
an HMAC-SHA-256 (the data plane's key) over the full method name, the SHA-256 of the request
bytes, the target (the endpoint the caller dialed), the timestamp and the nonce. A node accepts
a proof only if its target is one of the node's own names (``NodeNames``), its timestamp is
within ``WINDOW_S`` of the node's clock and its nonce was not seen before, so a captured proof
is good for exactly the one request it came with, to the one node it was sent to. The check
runs on the raw request bytes before anything parses them (``decoding.StrictDecoding``).
A node without a key accepts every call. Answers carry a proof too (``response_auth``).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Container, Iterable
from typing import Any, NamedTuple

import grpc

from lmcache_memkv.endpoints import parse_endpoint

HEADER = "x-memkv-auth"
WINDOW_S = 30.0  # clock skew plus transit a proof may show
# Nonces of accepted proofs are remembered until their timestamp leaves the window; past this
# many (about 1,600 calls a second sustained) a node refuses new calls rather than forget one.
MAX_REMEMBERED = 100_000
_CONTEXT = b"memkv-control-request-v2"
_SESSION_CONTEXT = b"memkv-session-v1"
_NONCE_BYTES = 12
_MAX_TARGET = 255
_MAX_PROOF = 16 + 2 * _NONCE_BYTES + 2 * _MAX_TARGET + 64 + 8
# Every part bounded before any conversion: a 5,000-digit timestamp is malformed, not a crash.
_PROOF = re.compile(r"v2\.([0-9]{1,15})\.([0-9a-f]{24})\.((?:[0-9a-f]{2}){1,255})\.([0-9a-f]{64})", re.ASCII)


class ProofError(Exception):
    """A refused proof: the status to answer with and why."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no choice of parts can imitate another."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _mac(key: bytes, method: str, target: str, stamp: str, nonce: str, digest: bytes) -> str:
    msg = frame(_CONTEXT, method.encode(), target.encode(), stamp.encode(), nonce.encode(), digest)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign(
    key: bytes, method: str, target: str, body: bytes, now: float | None = None, nonce: bytes | None = None
) -> str:
    """The metadata value proving ``key`` for one call of ``method`` (e.g. ``/memkv.v1.Cluster/Join``)
    with request bytes ``body`` to the node dialed as ``target``."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    nonce_hex = (os.urandom(_NONCE_BYTES) if nonce is None else nonce).hex()
    mac = _mac(key, method, target, stamp, nonce_hex, body_digest(body))
    return f"v2.{stamp}.{nonce_hex}.{target.encode().hex()}.{mac}"


def proof_metadata(key: bytes | None, method: str, target: str, body: bytes) -> list[tuple[str, str]]:
    return [] if key is None else [(HEADER, sign(key, method, target, body))]


def session_proof(key: bytes, client_nonce: bytes) -> bytes:
    """The node's answer to a Session.Hello nonce: proves the node holds the key too."""
    return hmac.new(key, _SESSION_CONTEXT + client_nonce, hashlib.sha256).digest()


# ---------------------------------------------------------------------- targets

_WILDCARDS = ("", "0.0.0.0", "::")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_RESOLVE_TTL_S = 60.0
_RESOLVE_CACHE = 256


def _is_local_address(ip: str) -> bool:
    """True if this host owns ``ip`` (only then can a socket bind to it)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


class NodeNames:
    """The names a caller may dial this node by; a proof's target must be one of them.

    Exactly: the node id, the advertised control endpoint, the control listen address as given
    and as bound; for a wildcard bind also 127.0.0.1, localhost, ::1 and the host's name at the
    bound port. Otherwise a ``HOST:PORT`` at the bound port whose host is (or resolves to) an
    address this node listens on: clients list nodes by IP or by DNS aliases (Kubernetes short
    names) that no node can enumerate. Resolution happens only for proofs whose MAC already
    verified (key holders), and is cached.
    """

    def __init__(self, node_id: str, listen: str | None = None, port: int = 0, advertised: str | None = None) -> None:
        self.node_id = node_id
        self.port = port
        self._exact: set[tuple[str, int]] = set()
        self._cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()
        self.wildcard = False
        self._bound_ips: frozenset[str] = frozenset()
        if listen is None:
            return
        host = parse_endpoint(listen)[0].lower()
        self.wildcard = host in _WILDCARDS
        for name in (listen, advertised):
            if name:
                h, p = parse_endpoint(name)
                self._exact.add((h.lower(), p))
        self._exact.add((host, port))
        if self.wildcard:
            # No getfqdn(): a reverse lookup can stall start-up; names that resolve here pass below.
            for h in (*_LOOPBACK_NAMES, socket.gethostname()):
                self._exact.add((h.lower(), port))
        else:
            self._bound_ips = frozenset(self._resolve(host))

    def __contains__(self, target: object) -> bool:
        if not isinstance(target, str):
            return False
        if target == self.node_id:
            return True
        try:
            host, port = parse_endpoint(target)
        except ValueError:
            return False
        host = host.lower()
        if (host, port) in self._exact:
            return True
        return bool(self.port) and port == self.port and self._listens_on(host)

    def _listens_on(self, host: str) -> bool:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(host)
            if cached is not None and cached[0] > now:
                return cached[1]
        ips = self._resolve(host)
        if self.wildcard:
            ok = any(_is_local_address(ip) for ip in ips)
        else:
            ok = bool(ips & self._bound_ips)
        with self._lock:
            if len(self._cache) >= _RESOLVE_CACHE:
                self._cache = {h: v for h, v in self._cache.items() if v[0] > now}
                while len(self._cache) >= _RESOLVE_CACHE:
                    del self._cache[next(iter(self._cache))]
            self._cache[host] = (now + _RESOLVE_TTL_S, ok)
        return ok

    @staticmethod
    def _resolve(host: str) -> set[str]:
        try:
            return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except (OSError, UnicodeError):
            return set()


# ---------------------------------------------------------------------- checking


class ProofChecker:
    """Verifies proofs for one node; remembers the nonces of accepted proofs within the window."""

    def __init__(
        self,
        key: bytes | None,
        names: Container[str],
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self.key = key
        self.names = names
        self.window_s = window_s
        self.max_remembered = max_remembered
        self._clock = clock
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # heap: (when the nonce may be forgotten, nonce)
        self._lock = threading.Lock()

    def remembered(self) -> int:
        with self._lock:
            return len(self._seen)

    def verify(self, method: str, value: str | None, body: bytes) -> None:
        """Return if ``value`` proves the key for this request; else raise ProofError."""
        if self.key is None:
            return
        if not value:
            raise ProofError("this node requires an auth key: set MEMKV_AUTH_KEY (or --auth-key-file) on the caller")
        match = _PROOF.fullmatch(value) if len(value) <= _MAX_PROOF else None
        if match is None:
            raise ProofError("malformed auth proof (this node speaks proof format v2)")
        stamp, nonce, target_hex, mac = match.groups()
        try:
            target = bytes.fromhex(target_hex).decode()
        except UnicodeDecodeError:
            raise ProofError("malformed auth proof: target is not UTF-8") from None
        now = self._clock()
        issued = int(stamp) / 1000
        if abs(now - issued) > self.window_s:
            raise ProofError(
                f"auth proof is stale or from the future (more than {self.window_s:.0f}s off; check the clocks)"
            )
        if not hmac.compare_digest(_mac(self.key, method, target, stamp, nonce, body_digest(body)), mac):
            raise ProofError("authentication failed: wrong auth key (or a proof for another request)")
        if target not in self.names:
            raise ProofError(f"auth proof is for {target!r}, not for this node")
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(heapq.heappop(self._expiry)[1])
            if nonce in self._seen:
                raise ProofError("auth proof replayed")
            if len(self._seen) >= self.max_remembered:
                raise ProofError("too many control calls within the proof window; retry", grpc.StatusCode.UNAVAILABLE)
            # Remembered for as long as its timestamp would still pass the freshness check.
            self._seen.add(nonce)
            heapq.heappush(self._expiry, (issued + self.window_s, nonce))

    def check(self, method: str, value: str | None, body: bytes) -> str | None:
        """None if ``value`` proves the key for this request; else the reason to refuse."""
        try:
            self.verify(method, value, body)
        except ProofError as exc:
            return exc.reason
        return None


# ---------------------------------------------------------------------- client side


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class ClientAuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds a fresh proof, bound to the request bytes and to ``target``, to every outgoing call.

    One interceptor per channel, and a channel per endpoint (``ChannelPool``), so ``target`` is
    the endpoint this channel dials.
    """

    def __init__(self, key: bytes, target: str) -> None:
        self._key = key
        self._target = target

    def _details(self, details: grpc.ClientCallDetails, request: Any) -> _CallDetails:
        method = details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        # What the stub sends: generated stubs serialise with SerializeToString.
        body = bytes(request) if isinstance(request, bytes | bytearray) else request.SerializeToString()
        metadata = [*(details.metadata or ()), (HEADER, sign(self._key, name, self._target, body))]
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
        return continuation(self._details(client_call_details, request), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details, request), request)


def header_value(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    value = next((v for k, v in metadata or () if k == HEADER), None)
    return value if isinstance(value, str) else None
