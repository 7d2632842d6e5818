"""`nanoplane serve --http-port`: the control plane and, in the same event loop, the OpenAI-compatible HTTP
gateway in front of it (the gateway reaches the control plane's public API over loopback gRPC)."""
from __future__ import annotations

import dataclasses
import sys

import structlog

from controlplane.main import start_control_plane
from gateway.config import GatewayConfig
from gateway.http_gateway import start_http_gateway
from gateway.main import until_signalled

log = structlog.get_logger("nanoplane")


def loopback_target(host: str, port: int) -> str:
    """How this process reaches a server it started on `host` (a wildcard address means any interface)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_with_gateway(cp_config, gateway_config: GatewayConfig) -> int:
    """The control plane and, in the same event loop, the HTTP gateway in front of it (on the same host, at
    gateway_config.http_port; its target, host and grace period follow cp_config); the exit code (1 = could
    not start)."""
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
    gateway_config = dataclasses.replace(gateway_config, target=loopback_target(cp_config.host, control_plane.port),
                                         host=cp_config.host, shutdown_grace_s=cp_config.shutdown_grace_s)
    try:
        gateway = await start_http_gateway(gateway_config)
    except OSError as e:
        print(f"nanoplane serve: error: cannot listen on {cp_config.host}:{gateway_config.http_port}: {e}",
              file=sys.stderr)
        await control_plane.stop(grace_s=0)
        return 1
    hurry = await until_signalled()
    gateway.stop_accepting()  # no new HTTP connections; those in flight stream on while the control plane drains
    await control_plane.stop(grace_s=cp_config.shutdown_grace_s, hurry=hurry)
    await gateway.stop(hurry)
    log.info("control plane stopped")
    return 0
