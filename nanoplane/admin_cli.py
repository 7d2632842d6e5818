"""`nanoplane admin`: the control plane's data planes, for rolling upgrades (the Admin API, admin token).

  nanoplane admin list                   every data plane, its state and load
  nanoplane admin drain ADDR [--move]    no new requests there; --move hands its requests to the others
  nanoplane admin undrain ADDR           place requests there again
  nanoplane admin join ADDR              connect a new data plane
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc

TOKEN_ENV = "NANOPLANE_ADMIN_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoplane admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("NANOPLANE_TARGET", "localhost:50051"),
                        help="HOST:PORT of the control plane [env NANOPLANE_TARGET]")
    parser.add_argument("--admin-token-file", default=os.environ.get("NANOPLANE_ADMIN_TOKEN_FILE", ""),
                        help=f"file whose first token is sent (else the env {TOKEN_ENV}) "
                             "[env NANOPLANE_ADMIN_TOKEN_FILE]")
    parser.add_argument("--tls-ca", default=os.environ.get("NANOPLANE_TLS_CA", ""),
                        help="PEM CA of the control plane's certificate; turns TLS on [env NANOPLANE_TLS_CA]")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every data plane, its state and load")
    drain = commands.add_parser("drain", help="stop placing new requests on a data plane")
    drain.add_argument("address", help="HOST:PORT as `list` shows it")
    drain.add_argument("--move", action="store_true",
                       help="hand its requests to the other data planes now instead of letting them finish")
    commands.add_parser("undrain", help="place requests on a drained data plane again").add_argument("address")
    commands.add_parser("join", help="connect a new data plane (HOST:PORT)").add_argument("address")
    return parser


def admin_token(path: str) -> str | None:
    if path:
        lines = [line.strip() for line in open(path).read().splitlines()]
        tokens = [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise SystemExit(f"nanoplane admin: error: --admin-token-file {path!r} holds no token")
        return tokens[0]
    return os.environ.get(TOKEN_ENV) or None


def format_status(d) -> str:
    return (f"{d.address:<28} {d.state:<9} running={d.num_running:<4} waiting={d.num_waiting:<4} "
            f"kv={d.kv_usage:6.1%} blocks={d.num_kv_blocks:<7} slots={d.max_num_seqs:<5} {d.device} {d.transport}")


def main(argv: list[str]) -> int:
    from client.credentials import sync_channel
    from proto.nanoplane.v1 import admin_pb2, admin_pb2_grpc

    args = build_parser().parse_args(argv)
    channel = sync_channel(args.target, [], args.tls_ca or None, admin_token(args.admin_token_file))
    stub = admin_pb2_grpc.AdminStub(channel)
    try:
        if args.command == "list":
            for d in stub.ListDataPlanes(admin_pb2.ListDataPlanesRequest(), timeout=args.timeout_s).dataplanes:
                print(format_status(d))
        elif args.command == "drain":
            print(format_status(stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address=args.address,
                                                                                    move=args.move),
                                                    timeout=args.timeout_s)))
        elif args.command == "undrain":
            print(format_status(stub.UndrainDataPlane(admin_pb2.UndrainDataPlaneRequest(address=args.address),
                                                      timeout=args.timeout_s)))
        else:
            print(format_status(stub.JoinDataPlane(admin_pb2.JoinDataPlaneRequest(address=args.address),
                                                   timeout=args.timeout_s)))
    except grpc.RpcError as e:
        print(f"nanoplane admin: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0
