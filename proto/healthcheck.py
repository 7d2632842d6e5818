"""`python -m proto.healthcheck`: ask a nanoplane server's grpc.health.v1 whether it is SERVING.

For container HEALTHCHECKs and exec probes, of either plane: exit status 0 when SERVING,
1 otherwise (NOT_SERVING, unreachable, TLS refused), with the reason on stderr. Imports
only grpc, so a probe costs a fraction of a second.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check(target: str, service: str = "", timeout_s: float = 3.0, tls_ca: str = "", tls_cert: str = "",
          tls_key: str = "", server_name: str = "") -> tuple[bool, str]:
    """(serving, what was found)."""
    if tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m proto.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=env("NANOPLANE_HEALTH_TARGET", "127.0.0.1:50051"),
                        help="HOST:PORT of the server (or of its --health-port) [env NANOPLANE_HEALTH_TARGET]")
    parser.add_argument("--service", default="", help="service name to ask about; empty = the whole server")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--tls-ca", default=env("NANOPLANE_HEALTH_TLS_CA", ""),
                        help="CA certificate to verify a TLS server with [env NANOPLANE_HEALTH_TLS_CA]")
    parser.add_argument("--tls-cert", default=env("NANOPLANE_HEALTH_TLS_CERT", ""),
                        help="client certificate, for a server that requires mutual TLS "
                             "[env NANOPLANE_HEALTH_TLS_CERT]")
    parser.add_argument("--tls-key", default=env("NANOPLANE_HEALTH_TLS_KEY", ""),
                        help="private key of --tls-cert [env NANOPLANE_HEALTH_TLS_KEY]")
    parser.add_argument("--server-name", default="", help="name to verify in the server's certificate")
    args = parser.parse_args(argv)
    serving, found = check(args.target, args.service, args.timeout_s, args.tls_ca, args.tls_cert, args.tls_key,
                           args.server_name)
    print(f"{args.target}: {found}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
