"""Call a server-module handler on a running ``lmcache server`` through LMCache's own client.

The request travels in LMCache's ``ServerModuleCallRequest`` envelope over the server's
request transport (ZMQ by default, gRPC when the server runs ``--transport grpc``), the
same path ``LMCacheMPConnector`` uses. LMCache is imported on first call only, so the
``memkv`` CLI stays quick to start when it never talks to a sidecar.
"""

from __future__ import annotations

import json
from typing import Any, Literal

Transport = Literal["zmq", "grpc"]
DEFAULT_PORT = 5555  # ``lmcache server --port`` default


class ServerModuleCallError(RuntimeError):
    """The server answered, but not with a handler result (unknown method, handler raised)."""

    def __init__(self, method: str, error: str) -> None:
        super().__init__(f"lmcache server module call {method!r} failed: {error}")
        self.method = method
        self.error = error


def server_url(host: str, port: int, transport: Transport = "zmq") -> str:
    """The request-client URL of an ``lmcache server`` (``[HOST]`` is accepted for IPv6)."""
    if transport not in ("zmq", "grpc"):
        raise ValueError(f"transport must be 'zmq' or 'grpc', got {transport!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'tcp' if transport == 'zmq' else 'grpc'}://{host}:{port}"


def call_server_module(
    host: str,
    port: int,
    method: str,
    payload: bytes = b"",
    timeout_s: float = 5.0,
    *,
    transport: Transport = "zmq",
) -> bytes:
    """Call the namespaced server-module ``method`` (e.g. ``"memkv.status"``); return its reply bytes.

    Raises ``TimeoutError`` when no answer arrives within ``timeout_s`` (server down, wrong
    port, wrong transport) and ``ServerModuleCallError`` when the server answers with an
    error (method not loaded, handler raised).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    url = server_url(host, port, transport)

    import zmq
    from lmcache.v1.multiprocess.protocols.server_module import ServerModuleCallRequest
    from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

    # A private ZMQ context with linger 0: a request queued for a server that never
    # answers must not hold up close() or interpreter exit.
    context: Any = None
    if transport == "zmq":
        context = zmq.Context()
        context.setsockopt(zmq.LINGER, 0)
    try:
        client = RequestClientFactory.create(url, context=context)
        try:
            future = client.server_module_call(ServerModuleCallRequest(method=method, payload=bytes(payload)))
            if not future.wait(timeout_s):
                raise TimeoutError(f"no answer from lmcache server at {url} to {method!r} within {timeout_s}s")
            response = future.result(0)
        finally:
            client.close()
    finally:
        if context is not None:
            context.term()
    if not response.success:
        raise ServerModuleCallError(method, response.error)
    return bytes(response.payload)


def call_json(
    host: str,
    port: int,
    method: str,
    request: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    *,
    transport: Transport = "zmq",
) -> dict[str, Any]:
    """``call_server_module`` for the JSON handlers of ``lmcache_memkv.server_ext.module``."""
    payload = json.dumps(request).encode() if request else b""
    reply = json.loads(call_server_module(host, port, method, payload, timeout_s, transport=transport))
    if not isinstance(reply, dict):
        raise ServerModuleCallError(method, f"expected a JSON object, got {type(reply).__name__}")
    return reply


__all__ = ["DEFAULT_PORT", "ServerModuleCallError", "call_json", "call_server_module", "server_url"]
