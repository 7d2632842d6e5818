"""How the data plane's gRPC port is exposed: TLS, mutual TLS, message sizes, keepalive, and their start-up checks.

With --tls-client-ca the data plane requires every connection to present a client
certificate signed by that CA: a control plane without one, or with one from another
CA, fails its TLS handshake and is never served.
"""
from __future__ import annotations

import grpc

from dataplane.config import DataPlaneConfig
from proto.transport import check_pem_file, read_pem, server_options


def config_problems(config: DataPlaneConfig) -> list[str]:
    problems = []
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        problems.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag, path, kind in (("--tls-cert", config.tls_cert, "certificate"),
                             ("--tls-key", config.tls_key, "private key"),
                             ("--tls-client-ca", config.tls_client_ca, "certificate")):
        problem = path and check_pem_file(path, flag, kind)
        if problem:
            problems.append(problem)
    if not 0 <= config.health_port < 65536:
        problems.append(f"--health-port must be in [0, 65535], got {config.health_port}")
    elif config.health_port and config.health_port == config.port:
        problems.append(f"--health-port must differ from --port ({config.port})")
    if config.max_message_bytes < 1024:
        problems.append(f"--max-message-bytes must be at least 1024, got {config.max_message_bytes}")
    if config.keepalive_s <= 0 or config.keepalive_timeout_s <= 0:
        problems.append("--keepalive-s and --keepalive-timeout-s must be positive")
    return problems


def server_credentials(config: DataPlaneConfig) -> grpc.ServerCredentials | None:
    """None = plaintext."""
    if not config.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(read_pem(config.tls_key), read_pem(config.tls_cert))],
        root_certificates=read_pem(config.tls_client_ca) if config.tls_client_ca else None,
        require_client_auth=bool(config.tls_client_ca))


def grpc_server_options(config: DataPlaneConfig) -> list[tuple[str, int]]:
    return server_options(config.max_message_bytes, config.keepalive_s, config.keepalive_timeout_s)
