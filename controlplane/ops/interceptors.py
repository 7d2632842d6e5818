"""Helpers shared by the public API's server interceptors (auth.py, shutdown.py).

Health and reflection stay open to everyone, always: a load balancer or kubelet
probing health carries no token, and must see NOT_SERVING during a shutdown rather
than an error.
"""
from __future__ import annotations

import grpc

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def is_open_method(method: str) -> bool:
    """method is the full path, "/package.Service/Method"."""
    return method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


def rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails every call with code and message."""

    async def reject(request_or_iterator, context):
        await context.abort(code, message)

    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject, *args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject, *args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, *args)
    return grpc.stream_stream_rpc_method_handler(reject, *args)
