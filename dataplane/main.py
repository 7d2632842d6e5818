"""`nanoplane dataplane`: load the model, size the KV cache, serve DataPlane over gRPC until SIGTERM."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable

import structlog

from dataplane.config import ENV_PREFIX, HELP, DataPlaneConfig
from proto.logs import add_logging_arguments, configure_logging_from_args
from proto.options import add_config_arguments, config_from_args, describe_config, usage_error
from proto.preflight import port_problem

log = structlog.get_logger("dataplane")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="nanoplane dataplane", usage="%(prog)s [options]",
                                               description=__doc__)
    add_config_arguments(parser, DataPlaneConfig, ENV_PREFIX, HELP)
    add_logging_arguments(parser)
    return parser


def run(config: DataPlaneConfig, ready_file: str | None = None) -> int:
    from dataplane.security import grpc_server_options, open_without_token, server_credentials
    from dataplane.server import build_health_server, build_server, set_serving
    from dataplane.tp_group import start_runner

    log.info("starting data plane", **describe_config(config))
    runner = start_runner(config)
    close_runner = getattr(runner, "close", lambda: None)  # stops the other tensor-parallel ranks
    try:
        server, port, health_servicer = build_server(runner, config.host, config.port, server_credentials(config),
                                                     grpc_server_options(config), config.shm_socket,
                                                     config.auth_token_file, open_without_token(config))
        health_server = None
        if config.health_port:
            health_server, _ = build_health_server(health_servicer, config.host, config.health_port)
    except RuntimeError as e:
        log.error("data plane could not start", error=str(e))
        print(f"nanoplane dataplane: error: {e}", file=sys.stderr)
        close_runner()
        return 1
    server.start()
    if health_server is not None:
        health_server.start()
    set_serving(health_servicer, True)  # weights loaded, KV cache allocated
    log.info("data plane serving", address=f"{config.host}:{port}", tls=bool(config.tls_cert),
             shm_socket=server.shm.path if server.shm else None,
             mutual_tls=bool(config.tls_client_ca), health_port=config.health_port or None,
             token=bool(server.token.token), token_file=server.token.written_path or config.auth_token_file or None)
    if not server.token.token and not config.tls_client_ca:
        log.warning("the data plane serves any process that reaches it (--insecure): no token, no mutual TLS",
                    address=f"{config.host}:{port}")
    if ready_file:  # tells a parent process which port was picked; rename so it never reads half a file
        with open(ready_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(ready_file + ".tmp", ready_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    set_serving(health_servicer, False)
    server.stop(grace=2).wait()
    if health_server is not None:
        health_server.stop(0)
    close_runner()
    log.info("data plane stopped")
    return 0


def main(argv: list[str] | None = None, default_model: Callable[[], str] | None = None) -> int:
    """default_model: where the model is when --model is empty (`nanoplane dataplane` knows the embedded one)."""
    parser = build_parser()
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    try:
        model = args.model or (default_model() if default_model else "")
        config = config_from_args(DataPlaneConfig, args, model=model)
    except (ValueError, FileNotFoundError) as e:
        return usage_error(parser.prog, str(e))
    problem = port_problem(config.host, config.port, "--port") or port_problem(config.host, config.health_port,
                                                                               "--health-port")
    if problem:
        return usage_error(parser.prog, problem)
    return run(config, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
