"""The node's one server interceptor (grpc.aio): proof check, strict decoding, signed answers.

The handler receives the request's raw bytes (``request_deserializer=None``), so with a key:

1. the caller's proof is checked over exactly the bytes received (``auth.ProofChecker``),
   before anything parses them or any servicer code runs (UNAUTHENTICATED otherwise; unknown
   methods too, so they cannot be probed without the key);
2. the bytes are decoded; bytes that do not parse are INVALID_ARGUMENT naming the method, not
   gRPC's generic INTERNAL ("Exception deserializing request"), which reads as a node bug;
3. every answer (each message of a stream) gets the node's proof (``response_auth``).

``/grpc.health.v1.Health/Check`` is exempt: Kubernetes and load-balancer probes cannot sign,
and its answer (SERVING or NOT_SERVING) tells a caller nothing the open port does not. Streams
(``Watch``) are not: each costs the node memory for its lifetime, so unproven callers must not
open them.

The server runs on one event loop. Handlers written as ``async def`` run on it; a handler left
as a plain ``def`` runs in an executor with a ``SyncContext``, so it never holds up the loop
(heartbeats, watches): ``slow_methods`` (statistics, fan-outs to peers) in ``slow_executor``,
any other sync handler in ``sync_executor``, so quick sync handlers never queue behind slow ones.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator
from concurrent.futures import Executor
from typing import Any, NoReturn

import grpc

from lmcache_memkv.control.auth import ProofChecker, ProofError, body_digest, header_value
from lmcache_memkv.control.response_auth import sign_reply

OnRefused = Callable[[str, str, str], None]  # (method, reason, peer)
UNAUTHENTICATED_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
_DONE = object()  # what ``next`` answers at the end of a sync stream (run in the executor)


class _SyncAbort(Exception):
    """Raised by ``SyncContext.abort`` in a worker thread; turned into the real abort on the loop."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SyncContext:
    """What a sync handler sees in place of ``grpc.ServicerContext``: the parts this project's
    handlers use, safe to call from a worker thread (nothing here touches the loop)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._peer = str(context.peer())
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._metadata = tuple(context.invocation_metadata() or ())

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _SyncAbort(code, details)

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def is_active(self) -> bool:
        return not self._context.done()


def _decoder(handler: grpc.RpcMethodHandler, method: str) -> Callable[[bytes, Any], Awaitable[Any]]:
    parse = handler.request_deserializer

    async def decode(raw: bytes, context: Any) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception as exc:  # protobuf raises its own DecodeError, or worse on odd input
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: request does not parse: {exc}")

    return decode


class StrictDecoding(grpc.aio.ServerInterceptor):
    """Wraps unary-request handlers (all of this project's); see the module docstring."""

    def __init__(
        self,
        checker: ProofChecker | None = None,
        on_refused: OnRefused | None = None,
        sync_executor: Executor | None = None,
        slow_executor: Executor | None = None,
        slow_methods: Container[str] = (),
    ) -> None:
        self._checker = checker
        self._on_refused = on_refused
        self._sync_executor = sync_executor  # None: the loop's default executor
        self._slow_executor = slow_executor if slow_executor is not None else sync_executor
        self._slow_methods = slow_methods

    def _guard(self, method: str, proof: str | None) -> Callable[[bytes, Any], Awaitable[bytes]]:
        """Checks the proof over the raw bytes; the request digest to sign the answer with."""
        checker = self._checker

        async def guard(raw: bytes, context: Any) -> bytes:
            if checker is not None:
                try:
                    checker.verify(method, proof, raw)  # an HMAC and a set: quick enough for the loop
                except ProofError as exc:
                    if self._on_refused is not None:
                        self._on_refused(method, exc.reason, context.peer())
                    await _abort(context, exc.code, exc.reason)
            return body_digest(raw)

        return guard

    async def _call_sync(self, method: str, fn: Callable[..., Any], *args: Any, context: Any) -> Any:
        """``fn(*args)`` in the method's executor; its ``SyncContext.abort`` becomes a real abort."""
        executor = self._slow_executor if method in self._slow_methods else self._sync_executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except _SyncAbort as exc:
            await _abort(context, exc.code, exc.details)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if method in UNAUTHENTICATED_METHODS and handler is not None:
            return handler
        key = self._checker.key if self._checker is not None else None
        guard = self._guard(method, header_value(handler_call_details.invocation_metadata))
        if handler is None:
            if key is None:
                return None

            async def unknown(raw: bytes, context: Any) -> Any:
                await guard(raw, context)
                await _abort(context, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")

            return grpc.unary_unary_rpc_method_handler(unknown)
        if handler.request_streaming:
            if key is None:
                return handler
            return _refuse_streaming(handler, method)
        decode = _decoder(handler, method)
        if handler.response_streaming:
            return self._wrap_stream(handler, method, key, guard, decode)
        unary = handler.unary_unary
        is_async = inspect.iscoroutinefunction(unary)

        async def unary_unary(raw: bytes, context: Any) -> Any:
            digest = await guard(raw, context)
            request = await decode(raw, context)
            if is_async:
                reply = await unary(request, context)
            else:
                reply = await self._call_sync(method, unary, request, SyncContext(context), context=context)
            if key is not None and reply is not None:
                sign_reply(key, method, digest, reply)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _wrap_stream(
        self,
        handler: grpc.RpcMethodHandler,
        method: str,
        key: bytes | None,
        guard: Callable[[bytes, Any], Awaitable[bytes]],
        decode: Callable[[bytes, Any], Awaitable[Any]],
    ) -> grpc.RpcMethodHandler:
        stream = handler.unary_stream
        if inspect.iscoroutinefunction(stream):
            # Writes its answers with context.write (grpc's own aio health Watch): answers carry
            # no header to sign, so only the proof check and decoding apply.
            async def writer(raw: bytes, context: Any) -> None:
                await guard(raw, context)
                await stream(await decode(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                writer, request_deserializer=None, response_serializer=handler.response_serializer
            )

        async def unary_stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            digest = await guard(raw, context)
            request = await decode(raw, context)
            index = 0
            async for reply in self._replies(method, stream, request, context):
                if key is not None:
                    sign_reply(key, method, digest, reply, index)
                index += 1
                yield reply

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=None, response_serializer=handler.response_serializer
        )

    async def _replies(self, method: str, stream: Callable[..., Any], request: Any, context: Any) -> AsyncIterator[Any]:
        """The servicer's answers: an async generator's directly, a sync one's one ``next`` at a
        time in an executor (it holds a worker only while producing a message)."""
        if inspect.isasyncgenfunction(stream):
            replies: AsyncIterator[Any] = stream(request, context)
            try:
                async for reply in replies:
                    yield reply
            finally:
                await replies.aclose()  # type: ignore[attr-defined]  # the servicer's cleanup runs now
            return
        sync_replies: Iterator[Any] = await self._call_sync(
            method, stream, request, SyncContext(context), context=context
        )
        try:
            while True:
                reply = await self._call_sync(method, next, sync_replies, _DONE, context=context)
                if reply is _DONE:
                    return
                yield reply
        finally:
            close = getattr(sync_replies, "close", None)
            if close is not None:
                await self._call_sync(method, close, context=context)


async def _abort(context: Any, code: grpc.StatusCode, reason: str) -> NoReturn:
    await context.abort(code, reason)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _refuse_streaming(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A request stream has no single body to bind a proof to: refused when a key is set."""
    reason = f"{method}: request-streaming calls cannot carry an auth proof"

    async def abort(_request: Any, context: Any) -> Any:
        await _abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)
