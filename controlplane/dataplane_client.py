"""The control plane's end of the DataPlane gRPC service: Describe, and a Step stream driven one plan at a time."""
from __future__ import annotations

import queue
import time

import grpc

from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.transport import client_options
from proto.step import StepPlan, StepResult, decode_result, encode_plan

MAX_MESSAGE_BYTES = 256 * 2**20
_CLOSE = object()


class DataPlaneUnavailable(RuntimeError):
    """The data plane cannot be reached or its Step stream broke."""


def tls_hint(details: str) -> str:
    """What a TLS connection failure most likely means, in terms of the control plane's flags."""
    if "Socket closed" in details:
        return ("; the data plane closed the TLS connection: it probably refused this control plane's client "
                "certificate (it accepts only certificates signed by its --tls-client-ca: check --dataplane-tls-cert "
                "and --dataplane-tls-key), or it does not speak TLS on that port")
    if "andshake" in details:
        return ("; the TLS handshake failed: check --dataplane-tls-ca (the CA of the data plane's certificate) and "
                "--dataplane-tls-server-name (a name in that certificate)")
    return ""


class DataPlaneClient:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, int | str]] | None = None):
        """credentials None = plaintext; options default to security.dataplane_channel_options' defaults."""
        self.target = target
        self.tls = credentials is not None
        options = options if options is not None else client_options(MAX_MESSAGE_BYTES, 5.0, 5.0)
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(target, options=options))
        self.stub = dataplane_pb2_grpc.DataPlaneStub(self.channel)
        self._plans: queue.Queue | None = None
        self._results = None

    def describe(self, timeout_s: float = 60.0) -> dataplane_pb2.DataPlaneInfo:
        """Waits up to timeout_s for the data plane to come up, then returns its facts."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # not wait_for_ready: a refused connection or TLS handshake fails at once, with a reason to report
                return self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=5)
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    details = e.details() or ""
                    hint = tls_hint(details) if self.tls else ""
                    raise DataPlaneUnavailable(f"data plane at {self.target} did not answer within {timeout_s:g} s: "
                                               f"{e.code().name}: {details}{hint}") from e
                time.sleep(0.2)

    def describe_once(self, timeout_s: float) -> dataplane_pb2.DataPlaneInfo:
        """One Describe call: the data plane's facts, or DataPlaneUnavailable at once (for the reconnect loop)."""
        try:
            return self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            details = e.details() or ""
            raise DataPlaneUnavailable(f"{e.code().name}: {details}{tls_hint(details) if self.tls else ''}") from e

    def open_stream(self) -> None:
        self.close_stream()
        self._plans = queue.Queue()
        self._results = self.stub.Step(iter(self._plans.get, _CLOSE))

    def step(self, plan: StepPlan) -> StepResult:
        # a stream that broke while the engine was idle (the data plane restarted, keepalive gave up on it)
        # is replaced rather than failing the request that comes next
        if self._plans is None or self._results.done():
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
