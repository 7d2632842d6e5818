"""Every command and snippet of README.md, run as written with the embedded default model on CPU.

The README's code blocks are read from the file, not copied here; each must be claimed by
one check below, so a new block without a check fails the test. The only changes made to
them: fixed ports become free ones (tests run beside other tests) and `hostA` of the
separate-hosts example becomes this host (both of its planes read the token file made
in the test's folder). The set-up `pip install` lines are not run (this
test runs after them); they are compared with what .ci/run runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.grpcurl import grpcurl_binary, json_messages
from tests.stack import ROOT, free_port

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()
START_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)]


def shell_commands(block: str) -> list[str]:
    """A sh block's commands: comments dropped, continuation lines and quoted newlines joined."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(pending)
        except ValueError:  # a quote still open: the command goes on
            continue
        commands.append(pending.strip())
        pending = ""
    assert not pending, f"unfinished command in the README: {pending!r}"
    return commands


def ci_command() -> str:
    lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.startswith("pip install")]
    assert len(lines) == 1, ".ci/run should run one install-and-test line"
    return lines[0]


class Readme:
    """The README's blocks, claimed one by one by the checks; what is left unclaimed fails the test."""

    def __init__(self):
        self.sh = [c for lang, text in code_blocks() if lang == "sh" for c in shell_commands(text)]
        self.python = [text for lang, text in code_blocks() if lang == "python"]
        others = [lang for lang, _ in code_blocks() if lang not in ("sh", "python")]
        assert not others, f"README blocks of a language this test cannot run: {others}"

    def command(self, pattern: str) -> str:
        found = [c for c in self.sh if re.search(pattern, c)]
        assert len(found) == 1, f"expected one README command matching {pattern!r}, found {found}"
        self.sh.remove(found[0])
        return found[0]

    def snippet(self, pattern: str) -> str:
        found = [s for s in self.python if re.search(pattern, s)]
        assert len(found) == 1, f"expected one README snippet matching {pattern!r}, found {len(found)}"
        self.python.remove(found[0])
        return found[0]


def with_ports(text: str, ports: dict[str, int | str]) -> str:
    for written, actual in ports.items():
        text = re.sub(rf"\b{re.escape(written)}\b", str(actual), text)
    return text


def wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{proc.args} did not listen on {port} within {START_TIMEOUT_S} s")


@pytest.fixture
def env(smollm2_gguf) -> dict:
    bin_dir = os.path.dirname(sys.executable)  # where pip put `nanoplane` and `grpcurl`
    grpcurl_binary()  # skips without grpcurl
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "NANOPLANE_LOG_FORMAT": "json"}


def test_readme_commands_and_snippets(env, tmp_path):
    readme = Readme()
    ci = ci_command()
    test_command = readme.command(r"pytest")
    assert test_command == ci, "the README's test command is what .ci/run runs"
    setup = readme.command(r"nanoplane serve$")
    *installs, serve_command = setup.split(" && ")
    assert " && ".join(installs) == ci.split(" && python -m pytest")[0].replace("'.[dev]'", "'.[examples]'")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"nanoplane[examples]"' in pyproject, "the dev extra installs what the examples use"

    serve_port, dp_port, cp_port, http_port = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []

    def start(command: str, name: str, **more_env: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen("exec " + command, shell=True, env={**env, **more_env}, cwd=tmp_path,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1], log

    def run(command: str, what: str, **more_env: str) -> subprocess.CompletedProcess:
        out = subprocess.run(command, shell=True, env={**env, **more_env}, cwd=tmp_path, capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S)
        assert out.returncode == 0, f"{what} failed:\n{command}\n{out.stdout}\n{out.stderr}"
        return out

    def run_python(code: str, what: str) -> str:
        return run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}", what).stdout

    try:
        # the model loads three times (serve, the separate data plane, the offline LLM): all at once;
        # serve's port by environment, so that its command stays as written
        serve, serve_log = start(serve_command, "serve", NANOPLANE_CP_PORT=str(serve_port))
        run(readme.command(r"secrets.token_hex"), "the shared data-plane token")
        dataplane_cmd, controlplane_cmd = (readme.command(r"^nanoplane dataplane"),
                                           readme.command(r"^nanoplane controlplane"))
        dataplane, dp_log = start(with_ports(dataplane_cmd, {"50061": dp_port}), "dataplane")
        offline_log = tmp_path / "offline.err"
        offline = subprocess.Popen([sys.executable, "-c", readme.snippet(r"from nanoplane import LLM")], env=env,
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=offline_log.open("w"), text=True,
                                   start_new_session=True)
        procs.append(offline)
        ports = {"50051": serve_port, "8000": http_port}
        gateway, gateway_log = start(with_ports(readme.command(r"^nanoplane gateway"), ports), "gateway")

        # separate hosts: host A is this host; the control plane finds the embedded default's tokenizer here
        wait_listening(dp_port, dataplane, dp_log)
        hosts = {"hostA": "127.0.0.1", "50061": dp_port, "50051": cp_port}
        controlplane, cp_log = start(with_ports(controlplane_cmd, hosts), "controlplane")

        wait_listening(serve_port, serve, serve_log)
        client_out = run_python(with_ports(readme.snippet(r"from client import Client"), ports), "Client snippet")
        assert "Paris" in client_out.splitlines()[0], client_out  # the chat answer, on a line of its own
        assert re.search(r" (length|stop) Usage\(prompt_tokens=\d+, completion_tokens=\d+", client_out), client_out

        generate_cmd = readme.command(r"^nanoplane generate")
        generated = run(generate_cmd, "nanoplane generate", NANOPLANE_TARGET=f"localhost:{serve_port}")
        assert "Paris" in generated.stdout and "finish_reason=stop" in generated.stderr

        listed = run(with_ports(readme.command(r"grpcurl .* list$"), ports), "grpcurl list").stdout.split()
        assert "nanoplane.v1.Generation" in listed and "grpc.health.v1.Health" in listed
        streamed = run(with_ports(readme.command(r"Generation/Generate"), ports), "grpcurl Generate").stdout
        assert "Paris" in "".join(m.get("text", "") for m in json_messages(streamed))
        health = run(with_ports(readme.command(r"Health/Check"), ports), "grpcurl health").stdout
        assert json.loads(health) == {"status": "SERVING"}

        wait_listening(http_port, gateway, gateway_log)
        openai_out = run_python(with_ports(readme.snippet(r"from openai import OpenAI"), ports), "OpenAI snippet")
        assert openai_out.strip(), "the OpenAI snippet streamed no text"
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30))
        assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
        by_file_name = json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/v1/models/SmolLM2-135M-Instruct.Q4_1.gguf", timeout=30))
        assert by_file_name["id"] == "SmolLM2-135M-Instruct"

        wait_listening(cp_port, controlplane, cp_log)
        remote = run(generate_cmd, "generate through the separate planes", NANOPLANE_TARGET=f"localhost:{cp_port}")
        assert "Paris" in remote.stdout

        offline_out, _ = offline.communicate(timeout=START_TIMEOUT_S)
        assert offline.returncode == 0, offline_log.read_text()[-3000:]
        assert "Paris" in offline_out.splitlines()[-1], offline_out

        assert not readme.sh and not readme.python, f"README blocks no check ran: {readme.sh + readme.python}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes[0] == 0, f"nanoplane serve exited with {codes[0]}:\n{serve_log.read_text()[-3000:]}"
    # the server's and its data plane's entries, on one stream: one JSON object per line. Native code
    # writes its own lines to the same stderr (libstdc++'s "terminate called ..." at a process's exit):
    # those are not ours, but must not hold an entry either.
    for line in serve_log.read_text().splitlines():
        if line.startswith("{"):
            json.loads(line)
        else:
            assert '{"' not in line, f"a log entry inside a foreign line: {line!r}"
