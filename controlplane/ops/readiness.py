"""The control plane's grpc.health.v1 status: SERVING while its data plane answers and no shutdown has begun.

Two sources move it. The Engine reports at once when the step stream breaks
(`dataplane_lost`, from the engine thread) and when it has reconnected (`dataplane_back`).
A watcher asks the data plane's own health service every `interval_s`, which notices a
data plane that died while the engine was idle, and sees it come back (the engine
reopens its stream on the next step); while the engine is still reconnecting (or
refuses the data plane that answers as incompatible), the watcher keeps NOT_SERVING.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = structlog.get_logger("controlplane.ops.readiness")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(self, health_servicer: health.aio.HealthServicer, services: tuple[str, ...],
                 dataplane_channel: grpc.Channel | Callable[[], list[grpc.Channel]], dataplane_target: str,
                 engine_connected: Callable[[], bool] = lambda: True):
        """dataplane_channel: the data plane's channel, or a function giving every data plane's (serving while
        any of them answers and engine_connected says some engine takes work)."""
        self._engine_connected = engine_connected
        self._health = health_servicer
        self._services = services
        self._channels = dataplane_channel if callable(dataplane_channel) else lambda: [dataplane_channel]
        self._target = dataplane_target
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task | None = None
        self.dataplane_ok = True  # start_control_plane has just talked to it
        self.draining = False
        self._losses = 0  # reports from the engine; a probe begun before one must not undo it
        self._last_error = ""

    @property
    def serving(self) -> bool:
        return self.dataplane_ok and not self.draining

    async def start(self, interval_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        await self._publish()
        self._watcher = asyncio.create_task(self._watch(interval_s), name="dataplane-health-watch")

    def dataplane_lost(self, message: str) -> None:
        """Thread-safe; the Engine calls it when the step stream to the data plane breaks."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._mark_lost, message)

    def dataplane_back(self) -> None:
        """Thread-safe; the Engine calls it once a compatible data plane answered and a new stream is open."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._mark_back)

    async def drain(self) -> None:
        """Shutdown began: NOT_SERVING from now on, so load balancers send new calls elsewhere."""
        self.draining = True
        await self._publish()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    def _mark_lost(self, message: str) -> None:
        self._losses += 1
        if self.dataplane_ok:
            log.error("data plane lost: not serving until it answers again", dataplane=self._target, reason=message)
            self.dataplane_ok = False
            asyncio.create_task(self._publish())

    def _mark_back(self) -> None:
        if not self.dataplane_ok:
            log.info("data plane answers again: serving", dataplane=self._target)
            self.dataplane_ok = True
            asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        status = SERVING if self.serving else NOT_SERVING
        for name in self._services:
            await self._health.set(name, status)

    def _dataplane_answers(self, timeout_s: float) -> bool:
        return any(self._answers(channel, timeout_s) for channel in self._channels())

    def _answers(self, channel: grpc.Channel, timeout_s: float) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            self._last_error = f"{e.code().name}: {e.details()}"
            return False
        self._last_error = f"its health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return reply.status == SERVING

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            losses = self._losses
            ok = await asyncio.to_thread(self._dataplane_answers, max(interval_s, 1.0)) and self._engine_connected()
            if ok == self.dataplane_ok or (ok and losses != self._losses):
                continue
            self.dataplane_ok = ok
            if ok:
                log.info("data plane answers again: serving", dataplane=self._target)
            else:
                log.error("data plane does not answer: not serving", dataplane=self._target, reason=self._last_error)
            await self._publish()
