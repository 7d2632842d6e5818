"""The control plane's end of the DataPlane gRPC service: Describe, and a Step stream driven one plan at a time."""
from __future__ import annotations

import queue
import time

import grpc

from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import StepPlan, StepResult, decode_result, encode_plan

MAX_MESSAGE_BYTES = 256 * 2**20
_CLOSE = object()


class DataPlaneUnavailable(RuntimeError):
    """The data plane cannot be reached or its Step stream broke."""


class DataPlaneClient:
    def __init__(self, target: str):
        self.target = target
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ])
        self.stub = dataplane_pb2_grpc.DataPlaneStub(self.channel)
        self._plans: queue.Queue | None = None
        self._results = None

    def describe(self, timeout_s: float = 60.0) -> dataplane_pb2.DataPlaneInfo:
        """Waits up to timeout_s for the data plane to come up, then returns its facts."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=5, wait_for_ready=True)
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise DataPlaneUnavailable(f"data plane at {self.target} did not answer within {timeout_s:.0f} s: "
                                               f"{e.code().name} {e.details()}") from e
                time.sleep(0.2)

    def open_stream(self) -> None:
        self.close_stream()
        self._plans = queue.Queue()
        self._results = self.stub.Step(iter(self._plans.get, _CLOSE))

    def step(self, plan: StepPlan) -> StepResult:
        if self._plans is None:
            self.open_stream()
        self._plans.put(encode_plan(plan, dataplane_pb2.StepPlan))
        try:
            pb = next(self._results)
        except grpc.RpcError as e:
            self._plans = None
            raise DataPlaneUnavailable(f"data plane step stream broke: {e.code().name}: {e.details()}") from e
        except StopIteration as e:
            self._plans = None
            raise DataPlaneUnavailable("data plane closed the step stream") from e
        result = decode_result(pb)
        if result.step_id != plan.step_id:
            raise DataPlaneUnavailable(f"data plane answered step {result.step_id} to plan {plan.step_id}")
        return result

    def close_stream(self) -> None:
        if self._plans is not None:
            self._plans.put(_CLOSE)
            self._plans = None
        if self._results is not None:
            self._results.cancel()
            self._results = None

    def close(self) -> None:
        self.close_stream()
        self.channel.close()
