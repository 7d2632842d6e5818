"""Requests that are not valid protobuf get INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC's asyncio server answers a request body its deserializer cannot parse (garbage
bytes, a truncated message, invalid UTF-8 in a string field, nesting past protobuf's
recursion limit) with UNKNOWN "Unexpected <class 'DecodeError'>", which reads like a
server bug. This interceptor, the outermost of the public server's, wraps every
method's deserializer so a failure becomes a marker object, and every handler so the
marker is answered with INVALID_ARGUMENT naming the message type and protobuf's reason.
Oversized messages never get this far: gRPC itself answers RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import contextlib
import inspect

import grpc


class UndecodableRequest:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, or anything a parser raises on hostile bytes
            return UndecodableRequest(str(e) or type(e).__name__)
    return deserialize


def _message(method: str, request: UndecodableRequest) -> str:
    hint = (" (every string field, the prompt and chat messages included, must be valid UTF-8)"
            if "UTF-8" in request.reason else
            " (truncated, of another message type, or nested deeper than protobuf's limit of 100)")
    return f"the request to {method} is not a valid protobuf message of its type: {request.reason}{hint}"


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        args = (_tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), *args)
        if handler.unary_stream:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                return grpc.unary_stream_rpc_method_handler(self._unary_to_stream(behavior, method), *args)
            if inspect.iscoroutinefunction(behavior):  # writes with context.write
                return grpc.unary_stream_rpc_method_handler(self._unary(behavior, method), *args)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(self._stream_to_stream(handler.stream_stream, method), *args)
        if handler.stream_unary and inspect.iscoroutinefunction(handler.stream_unary):
            return grpc.stream_unary_rpc_method_handler(self._stream_to_unary(handler.stream_unary, method), *args)
        return handler  # a synchronous handler: left as gRPC made it

    @staticmethod
    def _unary(behavior, method: str):
        async def unary(request, context):
            if isinstance(request, UndecodableRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            return await behavior(request, context)
        return unary

    @staticmethod
    def _unary_to_stream(behavior, method: str):
        async def unary_stream(request, context):
            if isinstance(request, UndecodableRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            # closed explicitly, so the servicer's own clean-up (an engine abort) runs now, not at GC
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        return unary_stream

    @staticmethod
    def _checked(requests, context, method: str):
        async def checked():
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
                yield request
        return checked()

    def _stream_to_stream(self, behavior, method: str):
        async def stream_stream(requests, context):
            async with contextlib.aclosing(behavior(self._checked(requests, context, method), context)) as responses:
                async for response in responses:
                    yield response
        return stream_stream

    def _stream_to_unary(self, behavior, method: str):
        async def stream_unary(requests, context):
            return await behavior(self._checked(requests, context, method), context)
        return stream_unary
