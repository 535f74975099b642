"""Request bytes that do not parse become INVALID_ARGUMENT, not gRPC's generic INTERNAL.

gRPC's own deserialisation failure answers INTERNAL ("Exception deserializing request"),
which reads as a node bug. This interceptor decodes the request itself and aborts with
INVALID_ARGUMENT naming the method, so a caller sending garbage learns it is the one at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc


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
    """Wraps unary-request handlers (all of this project's) so parse errors are INVALID_ARGUMENT."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        decode = _decoder(handler, str(handler_call_details.method))
        if handler.response_streaming:
            stream = handler.unary_stream

            def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                return stream(decode(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
            return unary(decode(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
        )
