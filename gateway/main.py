"""Running the OpenAI-compatible HTTP gateway: alone (`nanoplane gateway`) or beside the control plane
(`nanoplane serve --http-port`), until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from gateway.config import ENV_PREFIX, HELP, GatewayConfig
from gateway.http_gateway import start_http_gateway

log = structlog.get_logger("gateway")


async def until_signalled() -> asyncio.Event:
    """Waits for SIGTERM or SIGINT; returns an event that a second one sets (cut the grace period short)."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (hurry if stop.is_set() else stop).set())
    await stop.wait()
    return hurry


async def serve_gateway(config: GatewayConfig, root_certificates: bytes | None = None) -> int:
    try:
        running = await start_http_gateway(config, root_certificates)
    except OSError as e:
        print(f"nanoplane gateway: error: cannot listen on {config.host}:{config.http_port}: {e}", file=sys.stderr)
        return 1
    hurry = await until_signalled()
    await running.stop(hurry)
    log.info("HTTP gateway stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    from proto.logs import add_logging_arguments, configure_logging_from_args
    from proto.options import add_config_arguments, config_from_args, usage_error
    from proto.preflight import port_problem

    parser = argparse.ArgumentParser(prog="nanoplane gateway", description=(
        "Serve OpenAI-compatible HTTP (/v1/models, /v1/completions, /v1/chat/completions; /health, /ready; "
        "the OpenAPI schema at /docs) in front of a running nanoplane control plane."))
    add_config_arguments(parser, GatewayConfig, ENV_PREFIX, HELP)
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    try:
        config = config_from_args(GatewayConfig, args)
    except ValueError as e:
        parser.error(str(e))
    try:
        root_certificates = Path(config.tls_ca).read_bytes() if config.tls_ca else None
    except OSError as e:
        parser.error(f"--tls-ca {config.tls_ca!r} cannot be read: {e}")
    problem = port_problem(config.host, config.http_port, "--http-port")
    if problem:
        return usage_error(parser.prog, problem)
    return asyncio.run(serve_gateway(config, root_certificates))


if __name__ == "__main__":
    sys.exit(main())
