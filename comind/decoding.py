"""Requests that are not protobuf messages get INVALID_ARGUMENT, not UNKNOWN.

gRPC parses each request before the servicer sees it, and answers a
message that does not parse with UNKNOWN and a traceback in the ps's log,
as if the ps had a bug. :class:`DecodingInterceptor` parses the requests
itself, so that a garbled or hostile message is refused as bad input.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _decoding(handler, details.method)


def _decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    if not inspect.iscoroutinefunction(behavior):
        return handler  # a generator or a synchronous servicer: gRPC's parsing stays

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return parse(raw)
        except DecodeError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"A request to {method} is not a valid message ({error}); send it with coMind's "
                                f"client or code generated from comind/proto/comind.proto.")

    if handler.request_streaming:
        async def decoded(raw_requests, context):
            async def requests():
                async for raw in raw_requests:
                    yield await parsed(raw, context)
            return await behavior(requests(), context)
    else:
        async def decoded(raw_request, context):
            return await behavior(await parsed(raw_request, context), context)

    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(decoded, request_deserializer=None, response_serializer=handler.response_serializer)
