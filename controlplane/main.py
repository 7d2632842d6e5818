"""`nanoplane controlplane`: connect to a data plane, then serve the public Generation API until SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.structured.grammar_state import BitmaskFiller
from controlplane.serving.admission import AdmissionControl
from controlplane.serving.api import GenerationServicer
from controlplane.ops.auth import BearerTokenAuth, load_tokens
from controlplane.config import ENV_PREFIX, HELP, ControlPlaneConfig
from controlplane.link.dataplane_client import DataPlaneClient, DataPlaneUnavailable
from controlplane.serving.engine import Engine
from controlplane.ops.metrics import CounterReader, Gauge, MetricsServer, Registry
from controlplane.ops.readiness import Readiness
from controlplane.link.reconnect import DataPlaneReconnector
from controlplane.serving.request_decoding import RequestDecodingInterceptor
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.ops.security import (dataplane_channel_credentials, dataplane_channel_options,
                                   public_server_credentials, public_server_options)
from controlplane.ops.shutdown import DrainInterceptor, drain_and_stop
from controlplane.ops.telemetry import EngineTelemetry
from controlplane.serving.tokenizer import load_tokenizer
from controlplane.serving.validation import RequestLimits
from proto.logs import configure_logging
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc
from proto.options import add_config_arguments, config_from_args, describe_config

log = structlog.get_logger("controlplane")

# Young collections every this many net allocations rather than Python's 700: a step of a
# thousand sequences allocates a few thousand short-lived objects (its outputs), so at 700
# several collections per step promote them toward the old generation, whose full pass
# then walks every sequence's token list (~20 ms at 1024 sequences, every ~20 steps).
GC_GEN0_THRESHOLD = 10_000

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nanoplane controlplane", description=__doc__)
    add_config_arguments(parser, ControlPlaneConfig, ENV_PREFIX, HELP)
    return parser


def build_engine(config: ControlPlaneConfig):
    """Connects to the data plane and builds everything the API needs from what it reports."""
    dataplane = DataPlaneClient(config.dataplane, dataplane_channel_credentials(config),
                                dataplane_channel_options(config), config.transport, config.dataplane_max_message_bytes)
    info = dataplane.describe(config.dataplane_connect_timeout_s)
    dataplane.connect()  # --transport shm that cannot be is a start-up error
    tokenizer = load_tokenizer(config.tokenizer or info.model_path)
    eos = sorted(set(info.eos_token_ids) | set(tokenizer.eos_token_ids))
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info.num_kv_blocks, block_size=info.block_size, max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=info.max_num_batched_tokens, max_model_len=info.max_model_len,
        eos_token_ids=tuple(eos), enable_prefix_caching=config.enable_prefix_caching))
    limits = RequestLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                           kv_capacity_tokens=info.num_kv_blocks * info.block_size,
                           max_logprobs=config.max_logprobs, max_n=config.max_n)
    model_info = generation_pb2.ModelInfo(
        model_name=config.served_model_name or info.model_name, architecture=info.architecture,
        max_model_len=info.max_model_len, kv_capacity_tokens=limits.kv_capacity_tokens, block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks, vocab_size=info.vocab_size, dtype=info.dtype, device=info.device,
        attention_backend=info.attention_backend, max_num_seqs=info.max_num_seqs,
        dataplane_transport=dataplane.transport_name)
    log.info("connected to data plane", dataplane=config.dataplane, model=model_info.model_name,
             transport=dataplane.transport_name, transport_reason=dataplane.transport_reason,
             num_kv_blocks=info.num_kv_blocks, block_size=info.block_size, device=info.device)
    reconnector = DataPlaneReconnector(dataplane, info, config.dataplane_reconnect_timeout_s)
    scheduler.bitmask_filler = BitmaskFiller(config.structured_output_threads)
    return Engine(scheduler, tokenizer, dataplane, reconnector, config.overlap), tokenizer, limits, model_info


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    port: int
    model_info: generation_pb2.ModelInfo
    readiness: Readiness
    drain: DrainInterceptor
    registry: Registry
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    metrics: MetricsServer | None = None

    async def stop(self, grace_s: float = 10.0, hurry: asyncio.Event | None = None) -> None:
        """Graceful: NOT_SERVING, new calls refused, in-flight ones get grace_s, then "abort" (shutdown.py)."""
        await drain_and_stop(self.server, self.drain, self.readiness, self.engine, grace_s, hurry)
        await self.readiness.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
        self.engine.dataplane.close()


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises on a port in use or an address it cannot bind
        raise RuntimeError(f"could not listen on {address}: {e}") from e
    if port == 0:
        raise RuntimeError(f"could not listen on {address}")
    return port


async def start_health_server(health_servicer: health.aio.HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server of grpc.health.v1 alone, for probes that cannot do TLS (kubelet's grpc probe)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = listen(server, address, None)
    await server.start()
    return server, port


async def start_control_plane(config: ControlPlaneConfig) -> RunningControlPlane:
    engine, tokenizer, limits, model_info = build_engine(config)
    tokens = load_tokens(config.auth_token_file)
    drain = DrainInterceptor()
    # request decoding outermost: it must see every handler, a refusing one too
    interceptors = [RequestDecodingInterceptor(), *([BearerTokenAuth(tokens)] if tokens else []), drain]
    server = grpc.aio.server(interceptors=interceptors, options=public_server_options(config))
    admission = AdmissionControl(config.max_waiting_requests, config.max_pending_tokens,
                                 lambda: engine.num_running_requests)
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(engine, tokenizer, limits, model_info, admission), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = listen(server, f"{config.host}:{config.port}", public_server_credentials(config))

    readiness = Readiness(health_servicer, ("", SERVICE_NAME), engine.dataplane.channel, config.dataplane,
                          engine_connected=lambda: engine.dataplane_connected)
    registry = Registry({"model_name": model_info.model_name})
    engine.observer = EngineTelemetry(engine.scheduler, registry, readiness.dataplane_lost, readiness.dataplane_back)
    registry.add(Gauge("nanoplane:dataplane_connected", "1 while the data plane answers, else 0.",
                       lambda: float(readiness.dataplane_ok)))
    registry.add(CounterReader("nanoplane:requests_rejected_total",
                               "Requests refused with RESOURCE_EXHAUSTED by admission control.",
                               lambda: admission.num_rejected))
    filler = engine.scheduler.bitmask_filler  # structured output's cost on the engine thread
    registry.add(CounterReader("nanoplane:grammar_bitmask_seconds_total",
                               "Seconds the engine thread spent filling structured output's token bitmasks.",
                               lambda: filler.total_s))
    registry.add(CounterReader("nanoplane:grammar_bitmask_rows_total",
                               "Token bitmasks filled for constrained rows (one per constrained sampled token).",
                               lambda: float(filler.num_rows)))
    registry.add(Gauge("nanoplane:pending_tokens", "Prompt + max_tokens × n of the unfinished requests.",
                       lambda: admission.num_pending_tokens))
    running = RunningControlPlane(server, engine, health_servicer, port, model_info, readiness, drain, registry)
    if config.metrics_port:
        running.metrics = MetricsServer(registry, config.host, config.metrics_port).start()
    engine.start()
    await server.start()
    await readiness.start(config.dataplane_health_interval_s)
    if config.health_port:
        running.health_server, running.health_port = await start_health_server(
            health_servicer, f"{config.host}:{config.health_port}")
    log.info("control plane serving", address=f"{config.host}:{port}", model=model_info.model_name,
             tls=config.tls_cert != "", auth_tokens=len(tokens), health_port=running.health_port or None,
             metrics_port=running.metrics.port if running.metrics else None)
    return running


def settle_heap() -> None:
    """Once started, before serving: what exists now (modules, the tokenizer, the engine's pools)
    lives as long as the process, so no collection need walk it again (gc.freeze)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def serve(config: ControlPlaneConfig) -> int:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully; the exit code (1 = could not start)."""
    try:
        running = await start_control_plane(config)
    except (DataPlaneUnavailable, RuntimeError, ValueError, OSError) as e:
        log.error("control plane could not start", error=str(e))
        print(f"nanoplane controlplane: error: {e}", file=sys.stderr)
        return 1
    settle_heap()
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal cuts the grace period short
        loop.add_signal_handler(sig, lambda: (hurry if stop.is_set() else stop).set())
    await stop.wait()
    await running.stop(grace_s=config.shutdown_grace_s, hurry=hurry)
    log.info("control plane stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(ControlPlaneConfig, args)
    except ValueError as e:
        parser.error(str(e))
    log.info("starting control plane", **describe_config(config))
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
