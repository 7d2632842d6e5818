"""The DataPlane gRPC service: a thin servicer over ModelRunner, plus health and reflection.

Step is a bidi stream: one StepResult per StepPlan, in order. Opening a stream resets
the batch, and only one control plane may hold a stream at a time.
"""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dataplane.batch_state import PlanError
from dataplane.runner import ModelRunner
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.step import decode_plan, encode_result
from proto.transport import server_options

log = structlog.get_logger("dataplane.server")

SERVICE_NAME = dataplane_pb2.DESCRIPTOR.services_by_name["DataPlane"].full_name
MAX_MESSAGE_BYTES = 256 * 2**20


class DataPlaneServicer(dataplane_pb2_grpc.DataPlaneServicer):
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._stream_lock = threading.Lock()

    def Describe(self, request, context):
        f = self.runner.facts()
        return dataplane_pb2.DataPlaneInfo(
            model_name=f.model_name, model_path=f.model_path, architecture=f.architecture,
            vocab_size=f.vocab_size, max_model_len=f.max_model_len, block_size=f.block_size,
            num_kv_blocks=f.num_kv_blocks, max_num_seqs=f.max_num_seqs,
            max_num_batched_tokens=f.max_num_batched_tokens, eos_token_ids=f.eos_token_ids, dtype=f.dtype,
            device=f.device, attention_backend=f.attention_backend, kv_bytes_per_token=f.kv_bytes_per_token)

    def Step(self, request_iterator, context):
        if not self._stream_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "another control plane holds the Step stream of this data plane; "
                          "a data plane serves one control plane at a time")
        try:
            self.runner.reset()
            log.info("control plane connected", peer=context.peer())
            for pb_plan in request_iterator:
                try:
                    plan = decode_plan(pb_plan)
                    # joined with the control plane's "sequence entered slot" lines by step_id and slot
                    if len(plan.new_slots) or len(plan.drop_slots):
                        log.info("batch changed", step_id=plan.step_id, new_slots=plan.new_slots.tolist(),
                                 drop_slots=plan.drop_slots.tolist())
                    result = self.runner.execute(plan)
                except (PlanError, ValueError) as e:
                    log.error("rejected step plan", step_id=pb_plan.step_id, error=str(e))
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step plan {pb_plan.step_id} rejected: {e}")
                yield encode_result(result, dataplane_pb2.StepResult)
            log.info("control plane disconnected", peer=context.peer())
        finally:
            self.runner.reset()
            self._stream_lock.release()


def build_server(runner: ModelRunner, host: str, port: int, credentials: grpc.ServerCredentials | None = None,
                 options: list[tuple[str, int]] | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """credentials None = plaintext; options (dataplane.security.grpc_server_options) default to the defaults' sizes."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=options if options is not None else server_options(MAX_MESSAGE_BYTES, 10.0, 5.0))
    dataplane_pb2_grpc.add_DataPlaneServicer_to_server(DataPlaneServicer(runner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = listen(server, f"{host}:{port}", credentials)
    return server, bound, health_servicer


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
