"""How the control plane's connections are secured: TLS on the public API, mutual TLS towards the data plane.

Also the gRPC options of both connections (message sizes, keepalive) and the start-up
checks of every security-related flag, so a wrong path fails before anything listens.
Bearer tokens live in auth.py.
"""
from __future__ import annotations

import grpc

from controlplane.ops.auth import token_file_problem
from controlplane.config import ControlPlaneConfig
from proto.dataplane_access import token_file_problem as dataplane_token_file_problem
from proto.transport import MIN_PING_INTERVAL_S, check_pem_file, client_options, read_pem, server_options

# The public API pings idle clients this often, so a vanished client's streams are cancelled
# (and their KV blocks freed) within PUBLIC_KEEPALIVE_S + PUBLIC_KEEPALIVE_TIMEOUT_S.
PUBLIC_KEEPALIVE_S = 20.0
PUBLIC_KEEPALIVE_TIMEOUT_S = 10.0


def config_problems(config: ControlPlaneConfig) -> list[str]:
    problems = []
    if bool(config.tls_cert) != bool(config.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if bool(config.dataplane_tls_cert) != bool(config.dataplane_tls_key):
        problems.append("--dataplane-tls-cert and --dataplane-tls-key go together")
    if config.dataplane_tls_server_name and not dataplane_tls_enabled(config):
        problems.append("--dataplane-tls-server-name needs TLS to the data plane (--dataplane-tls-ca)")
    for flag, path, kind in (("--tls-cert", config.tls_cert, "certificate"),
                             ("--tls-key", config.tls_key, "private key"),
                             ("--dataplane-tls-ca", config.dataplane_tls_ca, "certificate"),
                             ("--dataplane-tls-cert", config.dataplane_tls_cert, "certificate"),
                             ("--dataplane-tls-key", config.dataplane_tls_key, "private key")):
        problem = path and check_pem_file(path, flag, kind)
        if problem:
            problems.append(problem)
    for flag, path in (("--auth-token-file", config.auth_token_file),
                       ("--metrics-auth-token-file", config.metrics_auth_token_file)):
        problem = path and token_file_problem(path, flag)
        if problem:
            problems.append(problem)
    if config.metrics_auth_token_file and not config.metrics_port:
        problems.append("--metrics-auth-token-file needs --metrics-port")
    if config.dataplane_token_file not in ("auto", ""):
        problem = dataplane_token_file_problem(config.dataplane_token_file, "--dataplane-token-file")
        if problem:
            problems.append(problem)
    if config.admin_token_file and (problem := token_file_problem(config.admin_token_file, "--admin-token-file")):
        problems.append(problem)
    for flag, port in (("--health-port", config.health_port), ("--metrics-port", config.metrics_port)):
        if not 0 <= port < 65536:
            problems.append(f"{flag} must be in [0, 65535], got {port}")
        elif port and port == config.port:
            problems.append(f"{flag} must differ from --port ({port})")
    if config.health_port and config.health_port == config.metrics_port:
        problems.append("--health-port and --metrics-port must differ")
    for flag, size in (("--max-message-bytes", config.max_message_bytes),
                       ("--dataplane-max-message-bytes", config.dataplane_max_message_bytes)):
        if size < 1024:
            problems.append(f"{flag} must be at least 1024, got {size}")
    if config.shutdown_grace_s < 0:
        problems.append(f"--shutdown-grace-s must not be negative, got {config.shutdown_grace_s}")
    if config.dataplane_keepalive_s < MIN_PING_INTERVAL_S:
        problems.append(f"--dataplane-keepalive-s must be at least {MIN_PING_INTERVAL_S} (the data plane "
                        f"refuses faster pings), got {config.dataplane_keepalive_s}")
    if config.dataplane_keepalive_timeout_s <= 0:
        problems.append("--dataplane-keepalive-timeout-s must be positive")
    if config.dataplane_health_interval_s <= 0:
        problems.append("--dataplane-health-interval-s must be positive")
    return problems


def public_server_credentials(config: ControlPlaneConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    return grpc.ssl_server_credentials([(read_pem(config.tls_key), read_pem(config.tls_cert))])


def max_pending_calls(config: ControlPlaneConfig) -> int:
    """Calls gRPC core may hold before the servicer takes them. Past its default of 1,000 it cancels the excess
    with a bare CANCELLED (a burst of 1,500 lost ~50), so allow a burst of several times --max-waiting-requests,
    which admission control then answers with RESOURCE_EXHAUSTED, counted."""
    return max(1000, 4 * config.max_waiting_requests)


def public_server_options(config: ControlPlaneConfig) -> list[tuple[str, int]]:
    return server_options(config.max_message_bytes, PUBLIC_KEEPALIVE_S, PUBLIC_KEEPALIVE_TIMEOUT_S) + [
        ("grpc.server.max_pending_requests", max_pending_calls(config)),
        ("grpc.server.max_pending_requests_hard_limit", 3 * max_pending_calls(config))]


def dataplane_tls_enabled(config: ControlPlaneConfig) -> bool:
    return bool(config.dataplane_tls_ca or config.dataplane_tls_cert)


def dataplane_channel_credentials(config: ControlPlaneConfig) -> grpc.ChannelCredentials | None:
    """None = plaintext; else TLS, verifying the data plane against --dataplane-tls-ca (or the system's
    roots) and presenting --dataplane-tls-cert when given."""
    if not dataplane_tls_enabled(config):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(config.dataplane_tls_ca) if config.dataplane_tls_ca else None,
        private_key=read_pem(config.dataplane_tls_key) if config.dataplane_tls_key else None,
        certificate_chain=read_pem(config.dataplane_tls_cert) if config.dataplane_tls_cert else None)


def dataplane_channel_options(config: ControlPlaneConfig) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = client_options(
        config.dataplane_max_message_bytes, config.dataplane_keepalive_s, config.dataplane_keepalive_timeout_s)
    if config.dataplane_tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.dataplane_tls_server_name))
    return options
