"""`nanoplane controlplane`: connect to a data plane, then serve the public Generation API until SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api import GenerationServicer
from controlplane.config import ENV_PREFIX, HELP, ControlPlaneConfig
from controlplane.dataplane_client import DataPlaneClient
from controlplane.engine import Engine
from controlplane.scheduler import Scheduler, SchedulerConfig
from controlplane.tokenizer import load_tokenizer
from controlplane.validation import RequestLimits
from proto.logs import configure_logging
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc
from proto.options import add_config_arguments, config_from_args, describe_config

log = structlog.get_logger("controlplane")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_MESSAGE_BYTES = 16 * 2**20


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nanoplane controlplane", description=__doc__)
    add_config_arguments(parser, ControlPlaneConfig, ENV_PREFIX, HELP)
    return parser


def build_engine(config: ControlPlaneConfig):
    """Connects to the data plane and builds everything the API needs from what it reports."""
    dataplane = DataPlaneClient(config.dataplane)
    info = dataplane.describe(config.dataplane_connect_timeout_s)
    tokenizer = load_tokenizer(config.tokenizer or info.model_path)
    eos = sorted(set(info.eos_token_ids) | set(tokenizer.eos_token_ids))
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info.num_kv_blocks, block_size=info.block_size, max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=info.max_num_batched_tokens, max_model_len=info.max_model_len,
        eos_token_ids=tuple(eos), enable_prefix_caching=config.enable_prefix_caching))
    limits = RequestLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                           kv_capacity_tokens=info.num_kv_blocks * info.block_size)
    model_info = generation_pb2.ModelInfo(
        model_name=config.served_model_name or info.model_name, architecture=info.architecture,
        max_model_len=info.max_model_len, kv_capacity_tokens=limits.kv_capacity_tokens, block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks, vocab_size=info.vocab_size, dtype=info.dtype, device=info.device,
        attention_backend=info.attention_backend, max_num_seqs=info.max_num_seqs)
    log.info("connected to data plane", dataplane=config.dataplane, model=model_info.model_name,
             num_kv_blocks=info.num_kv_blocks, block_size=info.block_size, device=info.device)
    return Engine(scheduler, tokenizer, dataplane), tokenizer, limits, model_info


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    port: int
    model_info: generation_pb2.ModelInfo

    async def stop(self, grace_s: float = 10.0) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace=grace_s)
        self.engine.stop()


async def start_control_plane(config: ControlPlaneConfig) -> RunningControlPlane:
    engine, tokenizer, limits, model_info = build_engine(config)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(engine, tokenizer, limits, model_info), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"could not listen on {config.host}:{config.port}")
    engine.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("control plane serving", address=f"{config.host}:{port}", model=model_info.model_name)
    return RunningControlPlane(server, engine, health_servicer, port, model_info)


async def serve(config: ControlPlaneConfig) -> None:
    running = await start_control_plane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests", grace_s=10)
    await running.stop(grace_s=10)
    log.info("control plane stopped")


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(ControlPlaneConfig, args)
    except ValueError as e:
        parser.error(str(e))
    log.info("starting control plane", **describe_config(config))
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
