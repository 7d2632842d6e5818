"""StepStream over the DataPlane/Step gRPC bidi stream (any host; TLS when the channel has it)."""
from __future__ import annotations

import queue

import grpc

from controlplane.link.transport import DataPlaneFenced, DataPlaneUnavailable
from proto.dataplane_access import FENCED
from proto.nanoplane.v1 import dataplane_pb2
from proto.step import StepPlan, StepResult, decode_result, encode_plan

_CLOSE = object()


class GrpcStepStream:
    name = "grpc"

    def __init__(self, stub, metadata=()):
        self._plans: queue.Queue = queue.Queue()
        self._results = stub.Step(iter(self._plans.get, _CLOSE), metadata=metadata)
        self._aborted = ""

    @property
    def broken(self) -> bool:
        return self._results.done()

    def send(self, plan: StepPlan) -> None:
        self._plans.put(encode_plan(plan, dataplane_pb2.StepPlan))

    def receive(self) -> StepResult:
        try:
            pb = next(self._results)
        except grpc.RpcError as e:
            if self._aborted:
                raise DataPlaneUnavailable(self._aborted) from e
            details = e.details() or ""
            if e.code() == grpc.StatusCode.ABORTED and details.startswith(FENCED):
                raise DataPlaneFenced(details) from e
            raise DataPlaneUnavailable(f"data plane step stream broke: {e.code().name}: {details}") from e
        except StopIteration as e:
            raise DataPlaneUnavailable("data plane closed the step stream") from e
        return decode_result(pb)

    def fence_message(self) -> str:
        """Why a stream that ended was fenced (a newer control plane took the session), else ""."""
        if not self._results.done() or self._results.code() != grpc.StatusCode.ABORTED:
            return ""
        details = self._results.details() or ""
        return details if details.startswith(FENCED) else ""

    def abort(self, reason: str) -> None:
        self._aborted = reason
        self._results.cancel()

    def close(self) -> None:
        self._plans.put(_CLOSE)
        self._results.cancel()
