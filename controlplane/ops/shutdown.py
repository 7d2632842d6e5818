"""Graceful shutdown of the public API: stop taking calls, let those in flight finish, abort the rest.

On SIGTERM: health turns NOT_SERVING and new calls get UNAVAILABLE (health and
reflection keep answering, so probes see the drain); calls in flight run on for up to
the grace period; whatever is still generating then ends with finish_reason "abort";
then the server and the engine stop.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import time

import grpc
import structlog

from controlplane.ops.interceptors import is_open_method, rejecting_handler

log = structlog.get_logger("controlplane.ops.shutdown")

SHUTTING_DOWN = "the control plane is shutting down; retry (another replica may serve the call)"


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts the API calls in flight and refuses new ones once `draining` is set."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._changed = asyncio.Event()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or is_open_method(handler_call_details.method):
            return handler
        if self.draining:
            return rejecting_handler(handler, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        return self._counted(handler)

    def _enter(self) -> None:
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        self._changed.set()

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            behavior = handler.unary_stream

            if not inspect.isasyncgenfunction(behavior):  # a handler that writes with context.write
                return grpc.unary_stream_rpc_method_handler(self._counted_coroutine(behavior), *args)

            async def unary_stream(request, context):
                self._enter()
                try:
                    # closed explicitly, so the servicer's own clean-up (an engine abort) runs now, not at GC
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    self._leave()
            return grpc.unary_stream_rpc_method_handler(unary_stream, *args)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._counted_coroutine(handler.unary_unary), *args)
        return handler  # the public API has no client-streaming methods

    def _counted_coroutine(self, behavior):
        async def counted(request, context):
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave()
        return counted

    async def wait_idle(self, timeout_s: float, hurry: asyncio.Event | None = None) -> bool:
        """True once no call is in flight; False when timeout_s passed (or `hurry` was set) first."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0 or (hurry is not None and hurry.is_set()):
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
            except asyncio.TimeoutError:
                pass
        return True


async def drain_and_stop(server: grpc.aio.Server, drain: DrainInterceptor, readiness, engine, grace_s: float,
                         hurry: asyncio.Event | None = None) -> None:
    """The shutdown sequence; `hurry` (a second SIGTERM) cuts the grace period short."""
    drain.draining = True
    await readiness.drain()
    log.info("shutting down: not serving, finishing in-flight calls", in_flight=drain.in_flight, grace_s=grace_s)
    if not await drain.wait_idle(grace_s, hurry):
        log.warning("grace period over: aborting the calls still in flight", in_flight=drain.in_flight)
        engine.abort_all()
        if not await drain.wait_idle(5.0):
            log.error("calls still in flight after their abort; cancelling them", in_flight=drain.in_flight)
    await server.stop(grace=1.0)
    engine.stop()
