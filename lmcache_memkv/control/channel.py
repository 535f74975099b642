"""Client channels to control endpoints: the auth proof on every call, TLS when a CA is given,
and the check of the node's proof on every answer (``ChannelPool.check_reply``)."""

from __future__ import annotations

import threading

import grpc
from google.protobuf.message import Message

from lmcache_memkv.control.auth import ClientAuthInterceptor
from lmcache_memkv.control.response_auth import check_reply
from lmcache_memkv.control.tls import CA_ENV, ca_from_env, channel_credentials, server_name_override

MAX_MESSAGE = 16 << 20
# A restarted node must be reachable again within a heartbeat or two, not after gRPC's
# default reconnect back-off (which grows to two minutes).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    # gRPC core takes this as the shortest time one connect attempt may take (MIN_CONNECT_TIMEOUT
    # of its backoff protocol), not only as a backoff: at 100 ms a handshake on a loaded host (or
    # an emulated guest) timed out "before receiving SETTINGS frame" and the call failed. A refused
    # connection still fails at once; every call keeps its own deadline.
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 0),  # every caller here has its own deadline and fail-over
]


def open_channel(endpoint: str, key: bytes | None, tls_ca: str | None = None) -> grpc.Channel:
    """A channel to ``endpoint``; with a key, every call's proof names ``endpoint`` as its target."""
    options = list(CHANNEL_OPTIONS)
    if tls_ca:
        name = server_name_override()
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        channel = grpc.secure_channel(endpoint, channel_credentials(tls_ca), options=options)
    else:
        channel = grpc.insecure_channel(endpoint, options=options)
    if key is None:
        return channel
    return grpc.intercept_channel(channel, ClientAuthInterceptor(key, endpoint.strip()))


class ChannelPool:
    """One channel per endpoint, shared by threads (gRPC channels are thread-safe)."""

    def __init__(self, key: bytes | None, tls_ca: str | None = None) -> None:
        self._key = key
        self._tls_ca = tls_ca
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def key(self) -> bytes | None:
        return self._key

    def check_reply(self, method: str, request: Message, reply: Message, index: int = 0) -> None:
        """Raise ``ReplyRefused`` (a ValueError) unless ``reply`` to ``request`` proves this pool's
        key; every consumer of a control answer calls this before using it."""
        check_reply(self._key, method, request, reply, index)

    def get(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("channel pool is closed")
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = open_channel(endpoint, self._key, self._tls_ca)
            return channel

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def describe_rpc_error(exc: BaseException) -> str:
    """A failed call in one line: status code and detail, with a hint where one helps."""
    if isinstance(exc, grpc.Call):
        code = exc.code()
        detail = exc.details() or ""
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return f"UNAUTHENTICATED: {detail} (check MEMKV_AUTH_KEY)"
        if code is grpc.StatusCode.UNAVAILABLE and "Socket closed" in detail and ca_from_env() is None:
            # What a plaintext call to a TLS port looks like: the node hangs up on the handshake.
            return (
                f"UNAVAILABLE: {detail} (if the node serves TLS (--tls-cert), set {CA_ENV} to the PEM file of "
                "the CA that signed its certificate)"
            )
        return f"{code.name}: {detail}" if detail else code.name
    return f"{type(exc).__name__}: {exc}"
