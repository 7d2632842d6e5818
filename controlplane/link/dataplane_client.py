"""The control plane's end of the data plane: Describe over gRPC, and a step stream over the transport chosen.

`send(plan)` hands a plan over without waiting; `receive()` returns the result of the
oldest plan sent and not yet received (MAX_OUTSTANDING plans may be in flight);
`step(plan)` is both. The stream is a gRPC bidi stream or, when the data plane is on
this host, a shared-memory session (controlplane/link/transport.py chooses, --transport).
"""
from __future__ import annotations

import time
from collections import deque

import grpc
import structlog

from controlplane.link.transport import DataPlaneUnavailable, StepStream, choose_transport
from controlplane.link.transport_grpc import GrpcStepStream
from controlplane.link.transport_shm import ShmStepStream
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import StepPlan, StepResult
from proto.transport import client_options

log = structlog.get_logger("controlplane.link.dataplane_client")

MAX_MESSAGE_BYTES = 256 * 2**20
SHM_SLOT_BYTES = 64 * 2**20  # the default --dataplane-max-message-bytes
MAX_OUTSTANDING = 2

__all__ = ["DataPlaneClient", "DataPlaneUnavailable", "tls_hint"]


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
                 options: list[tuple[str, int | str]] | None = None, transport: str = "auto",
                 shm_slot_bytes: int = SHM_SLOT_BYTES):
        """credentials None = plaintext; options default to security.dataplane_channel_options' defaults;
        transport: auto (shared memory when the data plane is on this host, else gRPC), shm or grpc."""
        self.target = target
        self.tls = credentials is not None
        options = options if options is not None else client_options(MAX_MESSAGE_BYTES, 5.0, 5.0)
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(target, options=options))
        self.stub = dataplane_pb2_grpc.DataPlaneStub(self.channel)
        self.transport = transport
        self.shm_slot_bytes = shm_slot_bytes
        self.info: dataplane_pb2.DataPlaneInfo | None = None  # the last Describe answer
        self.transport_name = ""  # of the stream open now, or last
        self.transport_reason = ""
        self._stream: StepStream | None = None
        self._outstanding: deque[int] = deque()  # step ids sent, not yet received

    def describe(self, timeout_s: float = 60.0) -> dataplane_pb2.DataPlaneInfo:
        """Waits up to timeout_s for the data plane to come up, then returns its facts."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # not wait_for_ready: a refused connection or TLS handshake fails at once, with a reason to report
                self.info = self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=5)
                return self.info
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
            self.info = self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=timeout_s)
            return self.info
        except grpc.RpcError as e:
            details = e.details() or ""
            raise DataPlaneUnavailable(f"{e.code().name}: {details}{tls_hint(details) if self.tls else ''}") from e

    # --- the step stream ---------------------------------------------------------------
    def connect(self) -> None:
        """Opens a step stream (the data plane resets its batch); raises DataPlaneUnavailable saying why not."""
        self.close_stream()
        if self.info is None:
            self.describe_once(10.0)
        name, why = choose_transport(self.transport, self.info, self.target)
        if name == "shm":
            try:
                self._stream = ShmStepStream(self.info.shm_socket, self.info.shm_ticket, self.shm_slot_bytes)
            except OSError as e:
                why = f"could not open the data plane's socket {self.info.shm_socket!r}: {e}"
                if self.transport == "shm":
                    raise DataPlaneUnavailable(f"--transport shm: {why}") from e
                name = "grpc"
        if name == "grpc":
            self._stream = GrpcStepStream(self.stub)
        if (name, why) != (self.transport_name, self.transport_reason):
            log.info("step transport chosen", dataplane=self.target, transport=name, reason=why)
        self.transport_name, self.transport_reason = name, why

    def open_stream(self) -> None:
        """connect(), but a failure is only logged: the next send() tries again and raises it (the engine's
        reconnect loop calls this after a Describe that succeeded)."""
        try:
            self.connect()
        except DataPlaneUnavailable as e:
            log.warning("could not open a step stream", dataplane=self.target, error=str(e))

    def send(self, plan: StepPlan) -> None:
        if len(self._outstanding) >= MAX_OUTSTANDING:
            raise RuntimeError(f"{MAX_OUTSTANDING} plans are in flight already: receive() one first")
        # a stream that broke while the engine was idle (the data plane restarted, keepalive gave up on it)
        # is replaced rather than failing the request that comes next
        if self._stream is None or (not self._outstanding and self._stream.broken):
            self.describe_once(5.0)  # the data plane may have restarted, on another socket
            self.connect()
        try:
            self._stream.send(plan)
        except DataPlaneUnavailable:
            self.close_stream()
            raise
        self._outstanding.append(plan.step_id)

    def receive(self) -> StepResult:
        stream = self._stream
        if not self._outstanding or stream is None:
            raise RuntimeError("receive() without a plan in flight")
        step_id = self._outstanding.popleft()
        try:
            result = stream.receive()
        except DataPlaneUnavailable:
            self.close_stream()
            raise
        if result.step_id != step_id:
            self.close_stream()
            raise DataPlaneUnavailable(f"data plane answered step {result.step_id} to plan {step_id}")
        return result

    def step(self, plan: StepPlan) -> StepResult:
        self.send(plan)
        return self.receive()

    def close_stream(self) -> None:
        self._outstanding.clear()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self.close_stream()
        self.channel.close()
