"""Logs: one entry per line even when processes share a stderr; console lines on a terminal, JSON otherwise."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from tests.stack import ROOT

NUM_ENTRIES = 2000
WRITER = f"""
import logging, sys, threading, structlog
from proto.logs import configure_logging
configure_logging()
log = structlog.get_logger("writer")
def entries(name):
    for i in range({NUM_ENTRIES}):
        log.info("entry", writer=name, i=i, padding="x" * 200)
threads = [threading.Thread(target=entries, args=(sys.argv[1] + str(t),)) for t in range(2)]
for t in threads: t.start()
for i in range({NUM_ENTRIES}):  # Python logging (grpc's, asyncio's) from a third thread, through the same writer
    logging.getLogger("grpc").warning("library warning %d", i)
for t in threads: t.join()
"""


def env(**more: str) -> dict:
    # unbuffered, as in containers: every write() reaches the file at once, so interleaving shows
    base = {k: v for k, v in os.environ.items() if not k.startswith("NANOPLANE_LOG_")}
    return {**base, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **more}


def test_processes_and_threads_sharing_a_stream_write_one_json_object_per_line(tmp_path):
    log_path = tmp_path / "shared.log"
    with open(log_path, "w") as shared:
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, name], stdout=shared, stderr=shared,
                                    env=env(NANOPLANE_LOG_FORMAT="json")) for name in "ab"]
        assert [w.wait(120) for w in writers] == [0, 0]
    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # fails on a line holding two entries, or half of one
    assert len(entries) == 2 * 3 * NUM_ENTRIES
    library = [e for e in entries if e["event"].startswith("library warning")]
    assert len(library) == 2 * NUM_ENTRIES and library[0]["level"] == "warning" and library[0]["logger"] == "grpc"


def run_on_terminal(*args: str, **more_env: str) -> str:
    """What a process writes to its stderr when stderr is a terminal."""
    controller, terminal = pty.openpty()
    code = ("import structlog; from proto.logs import add_logging_arguments, configure_logging_from_args; "
            "import argparse; p = argparse.ArgumentParser(); add_logging_arguments(p); "
            "configure_logging_from_args(p.parse_args()); structlog.get_logger().info('hello', answer=42)")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=terminal, env=env(**more_env))
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert proc.wait(60) == 0
    return out.decode()


def test_console_lines_on_a_terminal_json_when_forced():
    console = run_on_terminal().strip()
    forced = run_on_terminal("--log-format", "json").strip()
    by_env = run_on_terminal(NANOPLANE_LOG_FORMAT="json").strip()
    assert "hello" in console and "answer=42" in console and not console.startswith("{")
    assert json.loads(forced)["answer"] == 42 and json.loads(by_env)["event"] == "hello"
