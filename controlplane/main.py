"""`nanoplane controlplane`: connect to a data plane, then serve the public Generation API until SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.serving.admission import AdmissionControl
from controlplane.serving.api import GenerationServicer
from controlplane.ops.auth import ADMIN_TOKENS_ENV, BearerTokenAuth, load_tokens
from controlplane.config import ENV_PREFIX, HELP, ControlPlaneConfig
from controlplane.link.dataplane_client import DataPlaneUnavailable
from controlplane.serving import fleet
from controlplane.serving.admin import AdminServicer
from controlplane.serving.placement import Placement
from controlplane.serving.router import Router
from controlplane.serving.engine import Engine
from controlplane.ops.metrics import Metrics, MetricsServer
from controlplane.ops.readiness import Readiness
from controlplane.serving.request_decoding import RequestDecodingInterceptor
from controlplane.ops.security import public_server_credentials, public_server_options
from controlplane.ops.shutdown import DrainInterceptor, drain_and_stop
from controlplane.ops.telemetry import EngineTelemetry
from controlplane.serving.tokenizer import load_tokenizer
from controlplane.structured.compiler import StructuredOutputCompiler
from controlplane.serving.validation import RequestLimits
from proto.logs import add_logging_arguments, configure_logging_from_args
from proto.nanoplane.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from proto.options import add_config_arguments, config_from_args, describe_config, usage_error
from proto.preflight import port_problem, resolve_problem

log = structlog.get_logger("controlplane")

# Young collections every this many net allocations rather than Python's 700: a step of a
# thousand sequences allocates a few thousand short-lived objects (its outputs), so at 700
# several collections per step promote them toward the old generation, whose full pass
# then walks every sequence's token list (~20 ms at 1024 sequences, every ~20 steps).
GC_GEN0_THRESHOLD = 10_000

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nanoplane controlplane", usage="%(prog)s [options]",
                                               description=__doc__)
    add_config_arguments(parser, ControlPlaneConfig, ENV_PREFIX, HELP)
    add_logging_arguments(parser)
    return parser


def tokenizer_path(config: ControlPlaneConfig, model_path: str, local_models: dict[str, str]) -> str:
    """--tokenizer, else the data plane's model path when this host has it, else the model of that file name
    that this host has (local_models: file name -> path, as `nanoplane controlplane` knows the embedded one)."""
    if config.tokenizer:
        return config.tokenizer
    if os.path.exists(model_path):
        return model_path
    name = os.path.basename(model_path.rstrip("/"))
    if name in local_models:
        return local_models[name]
    raise RuntimeError(f"the data plane serves {model_path}, which is not on this host; pass --tokenizer PATH "
                       "(that model's folder or .gguf file on this host)")


def build_router(config: ControlPlaneConfig, local_models: dict[str, str] | None = None):
    """Connects to the data planes (at least one must answer) and builds everything the API needs from what
    they report: the Router over their Engines, the tokenizer, the request limits and the model's facts."""
    discovery = fleet.discovery_of(config)
    first = fleet.wait_for_first(config, discovery)
    clients = [first] + [c for t in discovery.targets() if t != first.target and (c := fleet.describe(config, t))]
    promised = fleet.promise_of([first.info])
    for client in clients[1:]:
        if problem := fleet.incompatible(promised, client):
            log.error("refusing a data plane", dataplane=client.target, reason=problem)
            client.close()
    clients = [c for c in clients if c is first or not fleet.incompatible(promised, c)]
    promised = fleet.promise_of([c.info for c in clients])
    tokenizer = load_tokenizer(tokenizer_path(config, first.info.model_path, local_models or {}))
    engines = [fleet.build_engine(config, client, tokenizer) for client in clients]
    info = first.info
    limits = RequestLimits(vocab_size=info.vocab_size, max_model_len=promised.max_model_len,
                           kv_capacity_tokens=promised.num_kv_blocks * info.block_size,
                           max_logprobs=config.max_logprobs, max_n=config.max_n,
                           max_prompt_chars=config.max_prompt_chars, max_prompt_tokens=config.max_prompt_tokens)
    model_info = generation_pb2.ModelInfo(
        model_name=config.served_model_name or info.model_name, architecture=info.architecture,
        max_model_len=promised.max_model_len, kv_capacity_tokens=limits.kv_capacity_tokens,
        block_size=info.block_size, num_kv_blocks=promised.num_kv_blocks, vocab_size=info.vocab_size,
        dtype=info.dtype, device=info.device, attention_backend=info.attention_backend,
        max_num_seqs=info.max_num_seqs, dataplane_transport=first.transport_name)
    router = Router(engines, Placement(config.placement, info.block_size))
    log.info("connected to data planes", dataplanes=[e.dataplane.target for e in engines], model=model_info.model_name,
             placement=config.placement, scheduling_policy=config.scheduling_policy)
    return router, tokenizer, limits, model_info, fleet.Joiner(config, discovery, tokenizer, promised, router.has,
                                                                router.add)


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    router: Router
    health: health.aio.HealthServicer
    port: int
    model_info: generation_pb2.ModelInfo
    readiness: Readiness
    drain: DrainInterceptor
    registry: Metrics
    tokenize_pool: ThreadPoolExecutor
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    metrics: MetricsServer | None = None
    joiner: fleet.Joiner | None = None
    grammars: StructuredOutputCompiler | None = None

    @property
    def engine(self) -> Engine:
        """The first data plane's Engine (the only one with a single data plane)."""
        return self.router.engines[0]

    async def stop(self, grace_s: float = 10.0, hurry: asyncio.Event | None = None) -> None:
        """Graceful: NOT_SERVING, new calls refused, in-flight ones get grace_s, then "abort" (shutdown.py)."""
        if self.joiner is not None:
            self.joiner.stop()
        await drain_and_stop(self.server, self.drain, self.readiness, self.router, grace_s, hurry)
        await self.readiness.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self.grammars is not None:
            self.grammars.close()
        self.router.close()


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


async def start_control_plane(config: ControlPlaneConfig,
                              local_models: dict[str, str] | None = None) -> RunningControlPlane:
    router, tokenizer, limits, model_info, joiner = await asyncio.to_thread(build_router, config, local_models)
    tokens = load_tokens(config.auth_token_file)
    admin_tokens = load_tokens(config.admin_token_file, env_name=ADMIN_TOKENS_ENV)
    drain = DrainInterceptor()
    # request decoding outermost: it must see every handler, a refusing one too
    interceptors = [RequestDecodingInterceptor(), *([BearerTokenAuth(tokens)] if tokens else []),
                    BearerTokenAuth(admin_tokens, admin=True), drain]
    server = grpc.aio.server(interceptors=interceptors, options=public_server_options(config))
    admission = AdmissionControl(config.max_waiting_requests, config.max_pending_tokens,
                                 lambda: router.num_running_requests)
    tokenize_pool = ThreadPoolExecutor(config.tokenizer_workers, thread_name_prefix="tokenize")
    # structured output's grammars, compiled for the model every plane serves (the same EOS ids: fleet.py)
    grammars = StructuredOutputCompiler.for_tokenizer(tokenizer, limits.vocab_size,
                                                      router.engines[0].scheduler.config.eos_token_ids)
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(router, tokenizer, limits, model_info, admission, tokenize_pool, grammars,
                           priority_enabled=config.scheduling_policy == "priority"), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(router, joiner.join), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, ADMIN_SERVICE_NAME, HEALTH_SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    port = listen(server, f"{config.host}:{config.port}", public_server_credentials(config))

    readiness = Readiness(health_servicer, ("", SERVICE_NAME), lambda: [e.dataplane.channel for e in router.engines],
                          config.dataplane, engine_connected=lambda: router.dataplane_connected)
    registry = Metrics({"model_name": model_info.model_name})

    def observe(engine: Engine) -> None:
        # health goes NOT_SERVING only when no data plane is left to take work
        engine.observer = EngineTelemetry(
            engine.scheduler, registry.labelled({"dataplane": engine.dataplane.target}),
            lambda message: None if router.dataplane_connected else readiness.dataplane_lost(message),
            readiness.dataplane_back)

    for engine in router.engines:
        observe(engine)
    router.on_join = observe
    registry.gauge("nanoplane:dataplane_connected", "1 while some data plane answers and takes work, else 0.",
                   lambda: float(readiness.dataplane_ok))
    registry.counter_reader("nanoplane:requests_rejected_total",
                            "Requests refused with RESOURCE_EXHAUSTED by admission control.",
                            lambda: admission.num_rejected)
    registry.gauge("nanoplane:pending_tokens", "Prompt + max_tokens × n of the unfinished requests.",
                   lambda: admission.num_pending_tokens)
    registry.counter_reader("nanoplane:requests_moved_total",
                            "Requests moved to another data plane (failover, drain with move).",
                            lambda: router.num_moved_requests)
    running = RunningControlPlane(server, router, health_servicer, port, model_info, readiness, drain, registry,
                                  tokenize_pool, joiner=joiner, grammars=grammars)
    if config.metrics_port:
        metrics_tokens = load_tokens(config.metrics_auth_token_file, environ={}) \
            if config.metrics_auth_token_file else []
        running.metrics = MetricsServer(registry, config.host, config.metrics_port, metrics_tokens).start()
    router.start()
    joiner.start()
    await server.start()
    await readiness.start(config.dataplane_health_interval_s)
    if config.health_port:
        running.health_server, running.health_port = await start_health_server(
            health_servicer, f"{config.host}:{config.health_port}")
    log.info("control plane serving", address=f"{config.host}:{port}", model=model_info.model_name,
             dataplanes=len(router.engines), tls=config.tls_cert != "", auth_tokens=len(tokens),
             admin_tokens=len(admin_tokens), health_port=running.health_port or None,
             metrics_port=running.metrics.port if running.metrics else None,
             metrics_auth=bool(config.metrics_auth_token_file))
    return running


def settle_heap() -> None:
    """Once started, before serving: what exists now (modules, the tokenizer, the engine's pools)
    lives as long as the process, so no collection need walk it again (gc.freeze)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def serve(config: ControlPlaneConfig, local_models: dict[str, str] | None = None) -> int:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully; the exit code (1 = could not start)."""
    try:
        running = await start_control_plane(config, local_models)
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


def listen_problem(config: ControlPlaneConfig) -> str | None:
    """A port of this plane that something else holds: found before waiting for the data plane."""
    return (port_problem(config.host, config.port, "--port")
            or port_problem(config.host, config.health_port, "--health-port")
            or port_problem(config.host, config.metrics_port, "--metrics-port"))


def dataplane_resolve_problem(config: ControlPlaneConfig) -> str | None:
    """None when some listed data plane's host resolves (or --dataplane-dns finds them): the others may appear
    later (a compose service not started yet) and join then; else why the one listed does not, or all of them."""
    targets = fleet.discovery_of(config).static
    problems = [p for t in targets if (p := resolve_problem(t, "--dataplane"))]
    if not problems or len(problems) < len(targets) or config.dataplane_dns:
        for p in problems:
            log.warning("a data plane's host does not resolve yet; it joins once it does", reason=p)
        return None
    return "; ".join(problems)


def main(argv: list[str] | None = None, local_models: dict[str, str] | None = None) -> int:
    """local_models: file name -> path of models this host has, for the tokenizer (see tokenizer_path)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    try:
        config = config_from_args(ControlPlaneConfig, args)
    except ValueError as e:
        return usage_error(parser.prog, str(e))
    problem = listen_problem(config) or dataplane_resolve_problem(config)
    if problem:
        return usage_error(parser.prog, problem)
    log.info("starting control plane", **describe_config(config))
    return asyncio.run(serve(config, local_models))


if __name__ == "__main__":
    sys.exit(main())
