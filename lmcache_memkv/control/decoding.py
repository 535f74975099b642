"""The node's one server interceptor: proof check, strict decoding, signed answers.

The handler receives the request's raw bytes (``request_deserializer=None``), so with a key:

1. the caller's proof is checked over exactly the bytes received (``auth.ProofChecker``),
   before anything parses them or any servicer code runs (UNAUTHENTICATED otherwise; unknown
   methods too, so they cannot be probed without the key);
2. the bytes are decoded; bytes that do not parse are INVALID_ARGUMENT naming the method, not
   gRPC's generic INTERNAL ("Exception deserializing request"), which reads as a node bug;
3. every answer (each message of a stream) gets the node's proof (``response_auth``).

``/grpc.health.v1.Health/Check`` is exempt: Kubernetes and load-balancer probes cannot sign,
and its answer (SERVING or NOT_SERVING) tells a caller nothing the open port does not. ``Watch``
is not: each stream holds a server thread for its lifetime, so unproven callers could use it to
exhaust the control plane's workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from lmcache_memkv.control.auth import ProofChecker, ProofError, body_digest, header_value
from lmcache_memkv.control.response_auth import sign_reply

OnRefused = Callable[[str, str, str], None]  # (method, reason, peer)
UNAUTHENTICATED_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


def _decoder(handler: grpc.RpcMethodHandler, method: str) -> Callable[[bytes, grpc.ServicerContext], Any]:
    parse = handler.request_deserializer

    def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception as exc:  # protobuf raises its own DecodeError, or worse on odd input
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: request does not parse: {exc}")

    return decode


class StrictDecoding(grpc.ServerInterceptor):
    """Wraps unary-request handlers (all of this project's); see the module docstring."""

    def __init__(self, checker: ProofChecker | None = None, on_refused: OnRefused | None = None) -> None:
        self._checker = checker
        self._on_refused = on_refused

    def _guard(self, method: str, proof: str | None) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        """Checks the proof over the raw bytes; the request digest to sign the answer with."""
        checker = self._checker

        def guard(raw: bytes, context: grpc.ServicerContext) -> bytes:
            if checker is not None:
                try:
                    checker.verify(method, proof, raw)
                except ProofError as exc:
                    if self._on_refused is not None:
                        self._on_refused(method, exc.reason, context.peer())
                    _abort(context, exc.code, exc.reason)
            return body_digest(raw)

        return guard

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        if method in UNAUTHENTICATED_METHODS and handler is not None:
            return handler
        key = self._checker.key if self._checker is not None else None
        guard = self._guard(method, header_value(handler_call_details.invocation_metadata))
        if handler is None:
            if key is None:
                return None

            def unknown(raw: bytes, context: grpc.ServicerContext) -> Any:
                guard(raw, context)
                _abort(context, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")

            return grpc.unary_unary_rpc_method_handler(unknown)
        if handler.request_streaming:
            if key is None:
                return handler
            return _refuse_streaming(handler, method)
        decode = _decoder(handler, method)
        if handler.response_streaming:
            stream = handler.unary_stream

            def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                digest = guard(raw, context)
                replies = stream(decode(raw, context), context)
                try:
                    for index, reply in enumerate(replies):
                        if key is not None:
                            sign_reply(key, method, digest, reply, index)
                        yield reply
                finally:
                    close = getattr(replies, "close", None)
                    if close is not None:
                        close()  # the servicer's own cleanup (a watch slot) runs now, not at GC

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
            digest = guard(raw, context)
            reply = unary(decode(raw, context), context)
            if key is not None and reply is not None:
                sign_reply(key, method, digest, reply)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
        )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
    context.abort(code, reason)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _refuse_streaming(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A request stream has no single body to bind a proof to: refused when a key is set."""
    reason = f"{method}: request-streaming calls cannot carry an auth proof"

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)

    def abort_stream(_request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)
        yield None  # pragma: no cover - abort raises

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    return grpc.stream_unary_rpc_method_handler(abort)
