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
    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        return _decoding(handler, details.method)


def _decoding(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    parse = handler.request_deserializer
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    if parse is None or not inspect.iscoroutinefunction(behavior):
        return handler  # nothing to parse, or a generator or a synchronous servicer: gRPC's parsing stays

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return parse(raw)
        except DecodeError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"A request to {method} is not a valid message ({error}); send it with coMind's "
                                f"client or code generated from comind/proto/comind.proto.")

    async def decoded_stream(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def requests() -> AsyncIterator[Any]:
            async for raw in raw_requests:
                yield await parsed(raw, context)
        return await behavior(requests(), context)

    async def decoded_unary(raw_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await behavior(await parsed(raw_request, context), context)

    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(decoded_stream if handler.request_streaming else decoded_unary, request_deserializer=None,
                response_serializer=handler.response_serializer)
