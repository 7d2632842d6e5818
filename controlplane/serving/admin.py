"""The nanoplane.v1.Admin servicer: list, drain, undrain and join data planes (router.py does the work).

Its calls need an admin token (auth.py); a wrong address is NOT_FOUND with the list of
the addresses there are, a data plane that cannot join is FAILED_PRECONDITION or
UNAVAILABLE with the reason.
"""
from __future__ import annotations

import asyncio

import grpc
import structlog

from controlplane.link.dataplane_client import DataPlaneUnavailable
from controlplane.serving.router import DataPlaneState, Router, UnknownDataPlane
from proto.nanoplane.v1 import admin_pb2, admin_pb2_grpc, generation_pb2

log = structlog.get_logger("controlplane.serving.admin")


def status_proto(state: DataPlaneState) -> generation_pb2.DataPlaneStatus:
    return generation_pb2.DataPlaneStatus(
        address=state.address, state=state.state, num_running=state.num_running, num_waiting=state.num_waiting,
        kv_usage=state.kv_usage, num_kv_blocks=state.num_kv_blocks, max_num_seqs=state.max_num_seqs,
        device=state.device, transport=state.transport)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, router: Router, join):
        """join(address) connects a data plane and adds it to the router (fleet.Joiner.join)."""
        self.router = router
        self._join = join

    async def ListDataPlanes(self, request, context):
        return admin_pb2.ListDataPlanesResponse(dataplanes=[status_proto(s) for s in self.router.states()])

    async def DrainDataPlane(self, request, context):
        try:
            state = self.router.drain(request.address, request.move)
        except UnknownDataPlane as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, e.args[0])
        log.info("admin: drain", dataplane=request.address, move=request.move)
        return status_proto(state)

    async def UndrainDataPlane(self, request, context):
        try:
            state = self.router.undrain(request.address)
        except UnknownDataPlane as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, e.args[0])
        log.info("admin: undrain", dataplane=request.address)
        return status_proto(state)

    async def JoinDataPlane(self, request, context):
        address = request.address.strip()
        if address.rpartition(":")[0] == "" or not address.rpartition(":")[2].isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"address must be HOST:PORT, got {address!r}")
        if self.router.has(address):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"data plane {address} is already here")
        try:
            await asyncio.to_thread(self._join, address)
        except DataPlaneUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"data plane {address} does not answer: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log.info("admin: join", dataplane=address)
        return status_proto(self.router.member(address).state())
