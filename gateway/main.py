"""Running the OpenAI-compatible HTTP gateway: alone (`nanoplane gateway`) or beside the control plane
(`nanoplane serve --http-port`), until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from gateway.http_gateway import DEFAULT_MAX_BODY_BYTES, start_http_gateway

log = structlog.get_logger("controlplane.gateway")


async def _until_signalled() -> asyncio.Event:
    """Waits for SIGTERM or SIGINT; returns an event that a second one sets (cut the grace period short)."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (hurry if stop.is_set() else stop).set())
    await stop.wait()
    return hurry


async def serve_gateway(target: str, host: str, http_port: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                        root_certificates: bytes | None = None) -> int:
    try:
        running = await start_http_gateway(target, host, http_port, max_body_bytes=max_body_bytes,
                                           root_certificates=root_certificates)
    except OSError as e:
        print(f"nanoplane gateway: error: cannot listen on {host}:{http_port}: {e}", file=sys.stderr)
        return 1
    await _until_signalled()
    await running.stop()
    log.info("HTTP gateway stopped")
    return 0


def loopback_target(host: str, port: int) -> str:
    """How this process reaches a server it started on `host` (a wildcard address means any interface)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_with_gateway(cp_config, http_port: int) -> int:
    """The control plane and, in the same event loop, the HTTP gateway in front of it (on the same host);
    the exit code (1 = could not start)."""
    from controlplane.main import start_control_plane

    if cp_config.tls_cert:
        print("nanoplane serve: error: --http-port serves plaintext HTTP over a loopback gRPC channel, which does "
              "not go with --tls-cert; run `nanoplane gateway --target HOST:PORT --tls-ca CA.pem` instead",
              file=sys.stderr)
        return 1
    try:
        control_plane = await start_control_plane(cp_config)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"nanoplane serve: error: {e}", file=sys.stderr)
        return 1
    try:
        gateway = await start_http_gateway(loopback_target(cp_config.host, control_plane.port), cp_config.host,
                                           http_port)
    except OSError as e:
        print(f"nanoplane serve: error: cannot listen on {cp_config.host}:{http_port}: {e}", file=sys.stderr)
        await control_plane.stop(grace_s=0)
        return 1
    hurry = await _until_signalled()
    gateway.server.close()  # no new HTTP connections; those in flight stream on while the control plane drains
    await control_plane.stop(grace_s=cp_config.shutdown_grace_s, hurry=hurry)
    await gateway.stop()
    log.info("control plane stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    from proto.logs import add_logging_arguments, configure_logging_from_args
    from proto.options import usage_error
    from proto.preflight import port_problem

    parser = argparse.ArgumentParser(prog="nanoplane gateway", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=("Serve OpenAI-compatible HTTP (/v1/models, /v1/completions, "
                                                  "/v1/chat/completions) in front of a running nanoplane control "
                                                  "plane."))
    parser.add_argument("--target", default=os.environ.get("NANOPLANE_TARGET", "localhost:50051"),
                        help="HOST:PORT of the control plane's gRPC API [env NANOPLANE_TARGET]")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on")
    parser.add_argument("--http-port", type=int, default=8000, help="port the HTTP server listens on (0 = any)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted (413 beyond)")
    parser.add_argument("--tls-ca", default=os.environ.get("NANOPLANE_TLS_CA", ""),
                        help="PEM CA certificate: reach the target over TLS verified against it [env NANOPLANE_TLS_CA]")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    if not 0 <= args.http_port < 65536:
        parser.error(f"--http-port must be in [0, 65535], got {args.http_port}")
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be positive")
    if ":" not in args.target:
        parser.error(f"--target must be HOST:PORT, got {args.target!r}")
    try:
        root_certificates = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as e:
        parser.error(f"--tls-ca {args.tls_ca!r} cannot be read: {e}")
    problem = port_problem(args.host, args.http_port, "--http-port")
    if problem:
        return usage_error(parser.prog, problem)
    return asyncio.run(serve_gateway(args.target, args.host, args.http_port, args.max_body_bytes, root_certificates))


if __name__ == "__main__":
    sys.exit(main())
