"""Requests that are not protobuf messages get INVALID_ARGUMENT, not UNKNOWN.

gRPC parses each request before the servicer sees it, and answers a
message that does not parse with UNKNOWN and a traceback in the ps's log,
as if the ps had a bug. :class:`DecodingInterceptor` parses the requests
itself, so that a garbled or hostile message is refused as bad input.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # Each method's handler, wrapped once: every call (thousands a second at scale) gets the same one.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        known = self._wrapped.get(details.method)
        if known is None or known[0] is not handler:
            known = self._wrapped[details.method] = handler, _decoding(handler, details.method)
        return known[1]


def _decoding(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    parse = handler.request_deserializer
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    if parse is None or not inspect.iscoroutinefunction(behavior):
        return handler  # nothing to parse, or a generator or a synchronous servicer: gRPC's parsing stays

    async def refuse(error: DecodeError, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"A request to {method} is not a valid message ({error}); send it with coMind's "
                            f"client or code generated from comind/proto/comind.proto.")

    async def decoded_stream(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def requests() -> AsyncIterator[Any]:
            async for raw in raw_requests:
                try:  # parsed here, not in a coroutine: one coroutine less for each message of a Round call
                    message = parse(raw)
                except DecodeError as error:
                    await refuse(error, context)
                yield message
        return await behavior(requests(), context)

    async def decoded_unary(raw_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = parse(raw_request)
        except DecodeError as error:
            await refuse(error, context)
        return await behavior(request, context)

    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(decoded_stream if handler.request_streaming else decoded_unary, request_deserializer=None,
                response_serializer=handler.response_serializer)
