"""The DataPlane gRPC service: a thin servicer over ModelRunner, plus health, reflection and shm sessions.

Step is a bidi stream: one StepResult per StepPlan, in order, run by dataplane/step_loop.py.
Opening a stream resets the batch, and only one control plane may hold a step session
(this stream or a shared-memory session, dataplane/shm_server.py) at a time.
"""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dataplane.runner import ModelRunner
from dataplane.shm_server import ShmSessionServer
from dataplane.step_loop import BUSY, SESSION_WAIT_S, PlanRejected, QueuedPlanSource, run_steps
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import decode_plan, encode_result
from proto.transport import server_options

log = structlog.get_logger("dataplane.server")

SERVICE_NAME = dataplane_pb2.DESCRIPTOR.services_by_name["DataPlane"].full_name
MAX_MESSAGE_BYTES = 256 * 2**20


class DataPlaneServicer(dataplane_pb2_grpc.DataPlaneServicer):
    def __init__(self, runner: ModelRunner, session_lock: threading.Lock | None = None,
                 shm: ShmSessionServer | None = None):
        self.runner = runner
        self.session_lock = session_lock or threading.Lock()
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
        if not self.session_lock.acquire(timeout=SESSION_WAIT_S):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, BUSY)
        try:
            self.runner.reset()
            log.info("control plane connected", peer=context.peer(), transport="grpc")
            source = QueuedPlanSource(request_iterator, decode_plan, lambda pb: pb.step_id)
            try:
                for result in run_steps(self.runner, source):
                    yield encode_result(result, dataplane_pb2.StepResult)
            except PlanRejected as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            log.info("control plane disconnected", peer=context.peer())
        finally:
            self.runner.reset()
            self.session_lock.release()


class DataPlaneServer:
    """The gRPC server and the shared-memory session server, started and stopped together (a grpc.Server
    otherwise: other attributes pass through)."""

    def __init__(self, grpc_server: grpc.Server, shm: ShmSessionServer | None):
        self.grpc_server, self.shm = grpc_server, shm

    def start(self) -> None:
        self.grpc_server.start()
        if self.shm is not None:
            self.shm.start()

    def stop(self, grace: float | None):
        if self.shm is not None:
            self.shm.stop()
        return self.grpc_server.stop(grace)

    def __getattr__(self, name):
        return getattr(self.grpc_server, name)


def build_server(runner: ModelRunner, host: str, port: int, credentials: grpc.ServerCredentials | None = None,
                 options: list[tuple[str, int]] | None = None,
                 shm_socket: str = "auto") -> tuple[DataPlaneServer, int, health.HealthServicer]:
    """credentials None = plaintext; options (dataplane.security.grpc_server_options) default to the defaults' sizes;
    shm_socket: the Unix socket of shared-memory sessions ("auto" = a private temporary one, "off" = none)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=options if options is not None else server_options(MAX_MESSAGE_BYTES, 10.0, 5.0))
    session_lock = threading.Lock()
    shm = ShmSessionServer(runner, session_lock, shm_socket) if shm_socket != "off" else None
    dataplane_pb2_grpc.add_DataPlaneServicer_to_server(DataPlaneServicer(runner, session_lock, shm), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        bound = listen(server, f"{host}:{port}", credentials)
    except RuntimeError:
        if shm is not None:
            shm.stop()
        raise
    return DataPlaneServer(server, shm), bound, health_servicer


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
