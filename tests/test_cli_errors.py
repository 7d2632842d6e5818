"""What a new user's mistakes print: one line naming the flag or the file, exit code 2, before any model loads;
and `--help` of every subcommand: each option with help text and its default."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.stack import ROOT

COMMANDS = ("serve", "controlplane", "dataplane", "generate", "gateway")
# a generous bound, not a timing: without the checks these cases took 13 s (a model load) and 60 s (a connect)
BOUND_S = 30


def nanoplane(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json"}
    return subprocess.run([sys.executable, "-m", "nanoplane.cli", *args], capture_output=True, text=True, env=env,
                          timeout=BOUND_S, cwd=ROOT)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{out.stderr}"
    return lines[0]


def test_unknown_command():
    line = one_line_error(nanoplane("srve"))
    assert "unknown command 'srve'" in line and "did you mean 'serve'" in line


@pytest.mark.parametrize("command", ["serve", "dataplane"])
def test_wrong_model_path(command, tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    line = one_line_error(nanoplane(command, "--model", str(missing)))
    assert line.startswith(f"nanoplane {command}: error:") and f"--model {missing}: no such file" in line
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hi")
    assert str(not_a_model) in one_line_error(nanoplane(command, "--model", str(not_a_model)))


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command, flag", [("serve", "--port"), ("serve", "--http-port"), ("dataplane", "--port"),
                                           ("controlplane", "--port"), ("gateway", "--http-port")])
def test_port_in_use_is_found_before_anything_starts(command, flag, taken_port, smollm2_gguf):
    # serve and dataplane get the real default model: a model load would show in the log lines, which are absent
    others = ["--port", "0"] if (command, flag) == ("serve", "--http-port") else []
    out = nanoplane(command, flag, str(taken_port), *others)
    line = one_line_error(out)
    assert line == f"nanoplane {command}: error: 127.0.0.1:{taken_port}: address already in use, pick another {flag}"


def test_unresolvable_dataplane_host_fails_at_once():
    line = one_line_error(nanoplane("controlplane", "--port", "0", "--dataplane", "no-such-host.invalid:50061"))
    assert "cannot resolve host 'no-such-host.invalid' of --dataplane no-such-host.invalid:50061" in line


def test_bad_flag_value_is_one_line():
    line = one_line_error(nanoplane("controlplane", "--port", "0", "--max-n", "0"))
    assert "--max-n must be >= 1, got 0" in line


def option_entries(help_text: str) -> dict[str, str]:
    """--flag -> its help text, from argparse's options section."""
    section = help_text.split("options:", 1)[1]
    entries, current = {}, None
    for line in section.splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = line[len(m.group(0)):]
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_option_with_help_and_default(command, capsys):
    from nanoplane.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse prints the help and exits, before anything runs
        main([command, "--help"])
    assert exited.value.code == 0
    entries = option_entries(capsys.readouterr().out)
    assert "--log-format" in entries or command == "generate"
    for flag, text in entries.items():
        if flag == "-h":
            continue
        # the metavar may come first; after it, words
        assert re.search(r"[a-z]{3,}", text), f"{command} {flag} has no help text: {text!r}"
        assert "default" in text, f"{command} {flag} does not say its default: {text!r}"


def test_a_list_of_data_planes_fails_only_when_no_host_resolves():
    line = one_line_error(nanoplane("controlplane", "--port", "0", "--dataplane",
                                    "no-such-host.invalid:50061,nor-this.invalid:50061"))
    assert "'no-such-host.invalid'" in line and "'nor-this.invalid'" in line
    from controlplane.config import ControlPlaneConfig
    from controlplane.main import dataplane_resolve_problem

    # a compose service not started yet does not resolve: it joins once it does
    assert dataplane_resolve_problem(ControlPlaneConfig(dataplane="127.0.0.1:50061,no-such-host.invalid:50061")) is None
