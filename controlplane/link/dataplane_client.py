"""The control plane's end of the data plane: Describe over gRPC, and a step stream over the transport chosen.

`send(plan)` hands a plan over without waiting; `receive()` returns the result of the
oldest plan sent and not yet received (MAX_OUTSTANDING plans may be in flight);
`step(plan)` is both. The stream is a gRPC bidi stream or, when the data plane is on
this host, a shared-memory session (controlplane/link/transport.py chooses, --transport).
Every call carries the data plane's token (proto/dataplane_access.py), read from its file
at each Describe (a restarted data plane on loopback has a new one); a LivenessWatch
(controlplane/link/liveness.py) aborts a stream whose data plane shows no sign of life.
Once a newer control plane fenced this one, it opens no stream again.
"""
from __future__ import annotations

import time
from collections import deque

import grpc
import structlog

from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.config import ControlPlaneConfig
from controlplane.link.liveness import LivenessWatch
from controlplane.link.transport import DataPlaneFenced, DataPlaneRefused, DataPlaneUnavailable, StepStream, \
    choose_transport
from controlplane.link.transport_grpc import GrpcStepStream
from controlplane.link.transport_shm import ShmStepStream
from proto.dataplane_access import default_token_path, is_loopback, metadata, read_token_file, session_proof
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import StepPlan, StepResult
from proto.transport import client_options

log = structlog.get_logger("controlplane.link.dataplane_client")

MAX_MESSAGE_BYTES = 256 * 2**20
SHM_SLOT_BYTES = 64 * 2**20  # the default --dataplane-max-message-bytes
MAX_OUTSTANDING = 2
LIVENESS_TIMEOUT_S = ControlPlaneConfig.dataplane_liveness_timeout_s
AUTO_TOKEN_RETRY_S = 2.0

__all__ = ["DataPlaneClient", "DataPlaneFenced", "DataPlaneUnavailable", "tls_hint", "read_token"]


def read_token(token_file: str, target: str) -> str | None:
    """The data plane's token: from token_file, or for "auto" the per-launch token of a data plane on loopback
    (None when there is none: another host, or a data plane under mutual TLS or --insecure)."""
    if token_file not in ("auto", ""):
        return read_token_file(token_file)
    host, _, port = target.rpartition(":")
    if token_file == "" or not is_loopback(host) or not port.isdigit():
        return None
    try:
        path = default_token_path(int(port))
        return read_token_file(path) if path.exists() else None
    except (OSError, RuntimeError):
        return None


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
                 shm_slot_bytes: int = SHM_SLOT_BYTES, token_file: str = "auto",
                 liveness_timeout_s: float = LIVENESS_TIMEOUT_S):
        """credentials None = plaintext; options default to security.dataplane_channel_options' defaults;
        transport: auto (shared memory when the data plane is on this host, else gRPC), shm or grpc;
        token_file: the data plane's token (read_token)."""
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
        self.token_file = token_file
        self.fenced = ""  # why a newer control plane took over; no stream is opened again
        self._token: str | None = None  # of the last Describe
        self._stream: StepStream | None = None
        self._outstanding: deque[int] = deque()  # step ids sent, not yet received
        self.liveness = LivenessWatch(self._probe, liveness_timeout_s, target)

    def _metadata(self) -> tuple:
        try:
            self._token = read_token(self.token_file, self.target)
        except OSError as e:
            raise DataPlaneUnavailable(f"could not read --dataplane-token-file {self.token_file!r}: {e}") from e
        return metadata(self._token)

    def _probe(self, timeout_s: float) -> bool:
        try:
            health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return True
        except grpc.RpcError:
            return False

    def describe(self, timeout_s: float = 60.0) -> dataplane_pb2.DataPlaneInfo:
        """Waits up to timeout_s for the data plane to come up, then returns its facts."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            try:
                # not wait_for_ready: a refused connection or TLS handshake fails at once, with a reason to report
                self.info = self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=5, metadata=self._metadata())
                return self.info
            except grpc.RpcError as e:
                # an auto token read a moment ago may be the file of a data plane that has since restarted
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and (
                        self.token_file != "auto" or time.monotonic() - started > AUTO_TOKEN_RETRY_S):
                    raise DataPlaneUnavailable(f"data plane at {self.target} refused this control plane: "
                                               f"{e.details()}") from e
                if time.monotonic() > deadline:
                    details = e.details() or ""
                    hint = tls_hint(details) if self.tls else ""
                    raise DataPlaneUnavailable(f"data plane at {self.target} did not answer within {timeout_s:g} s: "
                                               f"{e.code().name}: {details}{hint}") from e
                time.sleep(0.2)

    def describe_once(self, timeout_s: float) -> dataplane_pb2.DataPlaneInfo:
        """One Describe call: the data plane's facts, or DataPlaneUnavailable at once (for the reconnect loop)."""
        try:
            self.info = self.stub.Describe(dataplane_pb2.DescribeRequest(), timeout=timeout_s,
                                           metadata=self._metadata())
            return self.info
        except grpc.RpcError as e:
            details = e.details() or ""
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise DataPlaneRefused(f"data plane at {self.target} refused this control plane: {details}") from e
            raise DataPlaneUnavailable(f"{e.code().name}: {details}{tls_hint(details) if self.tls else ''}") from e

    # --- the step stream ---------------------------------------------------------------
    def connect(self) -> None:
        """Opens a step stream (the data plane resets its batch); raises DataPlaneUnavailable saying why not."""
        self.close_stream()
        if self.fenced:
            raise DataPlaneFenced(self.fenced)
        if self.info is None:
            self.describe_once(10.0)
        name, why = choose_transport(self.transport, self.info, self.target)
        if name == "shm":
            try:
                self._stream = ShmStepStream(self.info.shm_socket, session_proof(self._token, self.info.shm_ticket),
                                             self.shm_slot_bytes)
            except OSError as e:
                why = f"could not open the data plane's socket {self.info.shm_socket!r}: {e}"
                if self.transport == "shm":
                    raise DataPlaneUnavailable(f"--transport shm: {why}") from e
                name = "grpc"
        if name == "grpc":
            self._stream = GrpcStepStream(self.stub, metadata(self._token))
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
            fenced = self._stream.fence_message() if self._stream is not None else ""
            if fenced:
                self._lost(DataPlaneFenced(fenced))
                raise DataPlaneFenced(fenced)
            self.describe_once(5.0)  # the data plane may have restarted, on another socket
            self.connect()
        try:
            self._stream.send(plan)
        except DataPlaneUnavailable as e:
            self._lost(e)
            raise
        self._outstanding.append(plan.step_id)
        self.liveness.awaiting(self._stream)

    def receive(self) -> StepResult:
        stream = self._stream
        if not self._outstanding or stream is None:
            raise RuntimeError("receive() without a plan in flight")
        step_id = self._outstanding.popleft()
        try:
            result = stream.receive()
        except DataPlaneUnavailable as e:
            self._lost(e)
            raise
        self.liveness.answered(bool(self._outstanding))
        if result.step_id != step_id:
            self.close_stream()
            raise DataPlaneUnavailable(f"data plane answered step {result.step_id} to plan {step_id}")
        return result

    def step(self, plan: StepPlan) -> StepResult:
        self.send(plan)
        return self.receive()

    def _lost(self, e: DataPlaneUnavailable) -> None:
        if isinstance(e, DataPlaneFenced):
            self.fenced = str(e)
            log.error("a newer control plane took over the data plane: this one stops driving it",
                      dataplane=self.target, reason=str(e))
        self.close_stream()

    def close_stream(self) -> None:
        self.liveness.stop_watching()
        self._outstanding.clear()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self.close_stream()
        self.liveness.close()
        self.channel.close()
