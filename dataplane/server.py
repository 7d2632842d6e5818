"""The DataPlane gRPC service: a thin servicer over ModelRunner, plus health, reflection and shm sessions.

Step is a bidi stream: one StepResult per StepPlan, in order, run by dataplane/step_loop.py.
Only one control plane holds a step session (this stream or a shared-memory session,
dataplane/shm_server.py) at a time; opening one fences the older and starts from a clean
batch and KV cache (dataplane/sessions.py). Every DataPlane RPC needs the data plane's
credential (dataplane/security.py).
"""
from __future__ import annotations

from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dataplane.runner import ModelRunner
from dataplane.security import DataPlaneToken, TokenAuthInterceptor, resolve_token
from dataplane.sessions import BUSY, SessionFenced, StepSessions
from dataplane.shm_server import ShmSessionServer
from dataplane.step_loop import PlanRejected, QueuedPlanSource, run_steps
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import decode_plan, encode_result
from proto.transport import server_options

log = structlog.get_logger("dataplane.server")

SERVICE_NAME = dataplane_pb2.DESCRIPTOR.services_by_name["DataPlane"].full_name
MAX_MESSAGE_BYTES = 256 * 2**20


class DataPlaneServicer(dataplane_pb2_grpc.DataPlaneServicer):
    def __init__(self, runner: ModelRunner, sessions: StepSessions, shm: ShmSessionServer | None = None):
        self.runner = runner
        self.sessions = sessions
        self.shm = shm

    def Describe(self, request, context):
        f = self.runner.facts()
        shm = dict(host_id=self.shm.host_id, shm_socket=self.shm.path, shm_ticket=self.shm.ticket) if self.shm else {}
        return dataplane_pb2.DataPlaneInfo(
            model_name=f.model_name, model_path=f.model_path, architecture=f.architecture,
            vocab_size=f.vocab_size, max_model_len=f.max_model_len, block_size=f.block_size,
            num_kv_blocks=f.num_kv_blocks, max_num_seqs=f.max_num_seqs,
            max_num_batched_tokens=f.max_num_batched_tokens, eos_token_ids=f.eos_token_ids, dtype=f.dtype,
            device=f.device, attention_backend=f.attention_backend, kv_bytes_per_token=f.kv_bytes_per_token, **shm)

    def Step(self, request_iterator, context):
        source = QueuedPlanSource(request_iterator, decode_plan, lambda pb: pb.step_id)
        epoch = self.sessions.open(source.fence, "grpc")
        if epoch is None:
            context.abort(grpc.StatusCode.ABORTED, BUSY)
        try:
            log.info("control plane connected", peer=context.peer(), transport="grpc", epoch=epoch)
            try:
                for result in run_steps(self.runner, source):
                    yield encode_result(result, dataplane_pb2.StepResult)
            except PlanRejected as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except SessionFenced as e:
                context.abort(grpc.StatusCode.ABORTED, str(e))
            log.info("control plane disconnected", peer=context.peer())
        finally:
            self.sessions.close(epoch)


class DataPlaneServer:
    """The gRPC server and the shared-memory session server, started and stopped together (a grpc.Server
    otherwise: other attributes pass through)."""

    def __init__(self, grpc_server: grpc.Server, shm: ShmSessionServer | None, token: DataPlaneToken):
        self.grpc_server, self.shm, self.token = grpc_server, shm, token

    def start(self) -> None:
        self.grpc_server.start()
        if self.shm is not None:
            self.shm.start()

    def stop(self, grace: float | None):
        if self.shm is not None:
            self.shm.stop()
        self.token.close()
        return self.grpc_server.stop(grace)

    def __getattr__(self, name):
        return getattr(self.grpc_server, name)


def build_server(runner: ModelRunner, host: str, port: int, credentials: grpc.ServerCredentials | None = None,
                 options: list[tuple[str, int]] | None = None, shm_socket: str = "auto", auth_token_file: str = "auto",
                 without_token: bool = False) -> tuple[DataPlaneServer, int, health.HealthServicer]:
    """credentials None = plaintext; options (dataplane.security.grpc_server_options) default to the defaults' sizes;
    shm_socket: the Unix socket of shared-memory sessions ("auto" = a private temporary one, "off" = none);
    auth_token_file and without_token: the credential (dataplane.security.resolve_token; "auto" on loopback
    writes a per-launch token where a control plane on this host finds it)."""
    auth = TokenAuthInterceptor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[auth],
                         options=options if options is not None else server_options(MAX_MESSAGE_BYTES, 10.0, 5.0))
    sessions = StepSessions(runner)
    shm = ShmSessionServer(runner, sessions, shm_socket) if shm_socket != "off" else None
    dataplane_pb2_grpc.add_DataPlaneServicer_to_server(DataPlaneServicer(runner, sessions, shm), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        bound = listen(server, f"{host}:{port}", credentials)
        token = resolve_token(auth_token_file, host, bound, without_token)
    except (RuntimeError, OSError) as e:
        if shm is not None:
            shm.stop()
        raise RuntimeError(str(e)) from e
    auth.set_token(token.token)
    if shm is not None:
        shm.token = token.token
    return DataPlaneServer(server, shm, token), bound, health_servicer


def listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises on a port in use or an address it cannot bind
        raise RuntimeError(f"could not listen on {address}: {e}") from e
    if bound == 0:
        raise RuntimeError(f"could not listen on {address}")
    return bound


def build_health_server(health_servicer: health.HealthServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """A plaintext server of grpc.health.v1 alone, for probes that cannot do TLS (kubelet's grpc probe)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, listen(server, f"{host}:{port}")


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)
