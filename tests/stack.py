"""Both planes for tests: in this process (so tests can read the scheduler's block counts), or as real processes.

In-process, the planes still talk gRPC over loopback; the control plane's asyncio
server runs on a background thread with its own event loop.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from client import Client

ROOT = Path(__file__).resolve().parents[1]
# the control plane's --transport in these stacks: auto picks shared memory (same host); CI runs grpc too
TRANSPORT = os.environ.get("NANOPLANE_TEST_TRANSPORT", "auto")
TRANSPORTS = ["grpc", "shm"]  # what the end-to-end suites are parametrised over



def without_model_name(name_labels: str) -> str:
    """`name{labels}` of a sample line with the model_name and dataplane labels taken out (`name` when they were
    the only ones)."""
    text = re.sub(r'(model_name|dataplane)="[^"]*"', "", name_labels)
    return re.sub(r",(?=[,}])|(?<={),", "", text).replace("{}", "")

class InProcessControlPlane:
    """The control plane in this process, against the data plane at dataplane_target (so tests can read its
    scheduler's block counts); control_plane_options: ControlPlaneConfig fields; client_options: Client keywords."""

    def __init__(self, dataplane_target: str, tokenizer: str, control_plane_options: dict | None = None,
                 client_options: dict | None = None, transport: str | None = None):
        from controlplane.config import ControlPlaneConfig
        from controlplane.main import start_control_plane

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = ControlPlaneConfig(dataplane=dataplane_target, tokenizer=tokenizer,
                                    **{"port": 0, "transport": transport or TRANSPORT, **(control_plane_options or {})})
        config.validate()
        self.control_plane = asyncio.run_coroutine_threadsafe(start_control_plane(config), self.loop).result(120)
        self.target = f"127.0.0.1:{self.control_plane.port}"
        self.client = Client(self.target, timeout_s=120, **(client_options or {}))

    @property
    def engine(self):
        return self.control_plane.engine

    @property
    def scheduler(self):
        return self.control_plane.engine.scheduler

    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    def metric(self, sample: str) -> float:
        """One sample of the control plane's metrics by `name` or `name{label="value"}` (model_name left out)."""
        for line in self.control_plane.registry.render().splitlines():
            name_labels, _, value = line.rpartition(" ")
            if without_model_name(name_labels) == sample:
                return float(value)
        raise KeyError(f"no metric sample {sample}")

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Waits until the engine thread has processed every abort and finish."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.scheduler.has_unfinished() and self.control_plane.engine._inbox.empty():
                return
            time.sleep(0.02)
        raise TimeoutError("the engine did not become idle")

    def close(self) -> None:
        self.client.close()
        asyncio.run_coroutine_threadsafe(self.control_plane.stop(grace_s=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class InProcessStack(InProcessControlPlane):
    """Both planes in this process. dataplane_credentials: the data plane server's TLS (grpc.ServerCredentials)."""

    def __init__(self, model: str, control_plane_options: dict | None = None, dataplane_credentials=None,
                 client_options: dict | None = None, transport: str | None = None, **dataplane_options):
        from dataplane.config import DataPlaneConfig
        from dataplane.runner import ModelRunner
        from dataplane.server import build_server, set_serving

        options = {"device": "cpu", "num_threads": 2, **dataplane_options}
        self.runner = ModelRunner(DataPlaneConfig(model=model, port=0, **options))
        self.dp_server, self.dp_port, health = build_server(self.runner, "127.0.0.1", 0, dataplane_credentials)
        self.dp_server.start()
        set_serving(health, True)
        super().__init__(f"127.0.0.1:{self.dp_port}", model, control_plane_options, client_options, transport)

    def close(self) -> None:
        super().close()
        self.dp_server.stop(0)


class DataPlaneProcess:
    """`nanoplane dataplane` as a child process on a fixed port, to kill -9 and start again on the same port."""

    def __init__(self, model: str, log_path: Path, *args: str, port: int = 0):
        self.model, self.log_path, self.args = model, log_path, args
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, *extra_args: str, timeout_s: float = 120) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "console"}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nanoplane.cli", "dataplane", "--model", self.model, "--port",
                 str(self.port), "--device", "cpu", *self.args, *extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, timeout_s)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no goodbye on its connections, as when the process is killed or its host dies."""
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode}: {proc.args}")
        try:
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=0.5)
            return
        except grpc.FutureTimeoutError:
            continue
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


class ProcessStack:
    """`nanoplane dataplane` and `nanoplane controlplane` as two real processes on loopback."""

    def __init__(self, model: str, log_dir: Path, *dataplane_args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "console"}
        self.dp_port, self.cp_port = free_port(), free_port()
        self.procs = []
        dp_log = open(log_dir / "dataplane.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "nanoplane.cli", "dataplane", "--model", model, "--port", str(self.dp_port),
             "--device", "cpu", *dataplane_args], env=env, stdout=dp_log, stderr=subprocess.STDOUT))
        wait_for_port(self.dp_port, self.procs[0], 300)
        cp_log = open(log_dir / "controlplane.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "nanoplane.cli", "controlplane", "--dataplane", f"127.0.0.1:{self.dp_port}",
             "--port", str(self.cp_port), "--transport", TRANSPORT], env=env, stdout=cp_log, stderr=subprocess.STDOUT))
        wait_for_port(self.cp_port, self.procs[1], 300)
        self.target = f"127.0.0.1:{self.cp_port}"

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
