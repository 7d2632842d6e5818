"""How the data plane's gRPC port is exposed: its credential, TLS, mutual TLS, message sizes, keepalive, and
their start-up checks.

With --tls-client-ca the data plane requires every connection to present a client
certificate signed by that CA: a control plane without one, or with one from another
CA, fails its TLS handshake and is never served. With a token (--auth-token-file, auto
on loopback: proto/dataplane_access.py) every DataPlane RPC without it gets
UNAUTHENTICATED. Health and reflection stay open: they reveal no session and drive nothing.
A non-loopback --host with neither is refused at start-up unless --insecure.
"""
from __future__ import annotations

import hmac
import os

import grpc

from dataplane.config import DataPlaneConfig
from proto.dataplane_access import (METADATA_KEY, default_token_path, is_loopback, new_token, read_token_file,
                                    token_file_problem, write_token_file)
from proto.nanoplane.v1 import dataplane_pb2
from proto.transport import check_pem_file, read_pem, server_options

_PROTECTED_PREFIX = "/" + dataplane_pb2.DESCRIPTOR.services_by_name["DataPlane"].full_name + "/"
UNAUTHENTICATED = ("this data plane needs its token: give the control plane --dataplane-token-file naming the data "
                   "plane's --auth-token-file (a control plane on the same host finds an auto token by itself)")


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
    if config.auth_token_file not in ("auto", ""):
        problem = token_file_problem(config.auth_token_file, "--auth-token-file")
        if problem:
            problems.append(problem)
    elif not (is_loopback(config.host) or config.tls_client_ca or config.insecure):
        problems.append(f"--host {config.host} can be reached from other hosts: give --tls-client-ca (mutual TLS) or "
                        f"--auth-token-file (a token the control plane gets as --dataplane-token-file), or --insecure "
                        f"to serve any process that reaches it")
    return problems


class DataPlaneToken:
    """The token this data plane checks, and the auto file it wrote (removed by close())."""

    def __init__(self, token: str | None, written_path: str | None = None):
        self.token, self.written_path = token, written_path

    def close(self) -> None:
        if self.written_path:
            try:
                os.unlink(self.written_path)
            except OSError:
                pass


def open_without_token(config: DataPlaneConfig) -> bool:
    """No token is made for --auth-token-file auto: mutual TLS is the credential, or --insecure asked for none."""
    return config.insecure or bool(config.tls_client_ca)


def resolve_token(auth_token_file: str, host: str, port: int, without_token: bool = False) -> DataPlaneToken:
    """The token of a data plane listening on host:port. auto on loopback makes one and writes it to
    proto.dataplane_access.default_token_path(port), unless without_token (open_without_token)."""
    if auth_token_file not in ("auto", ""):
        return DataPlaneToken(read_token_file(auth_token_file))
    if without_token or not is_loopback(host):
        return DataPlaneToken(None)
    token, path = new_token(), str(default_token_path(port))
    write_token_file(path, token)
    return DataPlaneToken(token, path)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for a DataPlane RPC without `authorization: Bearer <token>`. The token is set once the port
    is bound (an auto token's file is named after it), before the server starts; None = no check."""

    def __init__(self):
        self._expected: bytes | None = None

    def set_token(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    def accepts(self, invocation_metadata) -> bool:
        if self._expected is None:
            return True
        for key, value in invocation_metadata or ():
            if key == METADATA_KEY and hmac.compare_digest(str(value).encode(), self._expected):
                return True
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or not handler_call_details.method.startswith(_PROTECTED_PREFIX)
                or self.accepts(handler_call_details.invocation_metadata)):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


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
