"""LocalPlanes: both planes on this host for the offline LLM and the serving benchmark.

The data plane runs as a child process (`python -m dataplane --port 0 --ready-file F`,
as `nanoplane serve` starts it, with a per-launch token file that only this user can read);
the control plane runs in this process, on the caller's EventLoopThread, through
`controlplane.main.start_control_plane`, and presents that token. The planes find each
other over gRPC on loopback; with the default `transport="auto"` the steps then travel
over the shared-memory rings (proto/shm_channel.py), as the child is on this host.

Cleanup is certain: `close()`, garbage collection and interpreter exit (weakref.finalize)
all stop the control plane and terminate the child, so no orphan process is left.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import fields, replace
from pathlib import Path

from client.loop_thread import EventLoopThread

ROOT = Path(__file__).resolve().parents[1]
# Nano-vLLM's names for two data plane options
ALIASES = {"kvcache_block_size": "block_size", "num_kvcache_blocks": "num_kv_blocks"}
CONTROL_PLANE_OPTIONS = ("tokenizer", "served_model_name", "enable_prefix_caching", "max_logprobs", "max_n",
                         "speculative_method", "num_speculative_tokens", "speculative_ngram_min",
                         "speculative_ngram_max", "speculative_disable_batch_size", "speculative_min_acceptance")


def split_options(options: dict) -> tuple[dict, dict]:
    """Engine keyword arguments -> (data plane config fields, control plane config fields)."""
    from controlplane.config import ControlPlaneConfig
    from dataplane.config import SERVE_CHILD_OVERRIDES, DataPlaneConfig

    # a loopback child: its address and TLS are set here, like `nanoplane serve` sets them
    dp_fields = {f.name for f in fields(DataPlaneConfig)} - {"model", *SERVE_CHILD_OVERRIDES}
    cp_fields = {f.name for f in fields(ControlPlaneConfig)} & set(CONTROL_PLANE_OPTIONS)
    dp, cp = {}, {}
    for name, value in options.items():
        name = ALIASES.get(name, name)
        if name == "tensor_parallel_size" and name not in dp_fields:
            if value != 1:
                raise ValueError(f"tensor_parallel_size={value} is not supported yet: the data plane runs on "
                                 "one device; use tensor_parallel_size=1")
        elif name in dp_fields:
            dp[name] = value
        elif name in cp_fields:
            cp[name] = value
        else:
            known = sorted(dp_fields | cp_fields | set(ALIASES) | {"tensor_parallel_size"})
            raise TypeError(f"unknown engine option {name!r}; the options are: {', '.join(known)}")
    return dp, cp


def dataplane_command(config, ready_file: str) -> list[str]:
    from proto.options import describe_config

    cmd = [sys.executable, "-m", "dataplane", "--ready-file", ready_file]
    for name, value in describe_config(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd += [flag, str(value)]
    return cmd


class _Resources:
    """What must be released; holds no reference to its owner, so the owner can be collected."""

    def __init__(self, loop: EventLoopThread, tmpdir: str):
        self.loop = loop
        self.tmpdir = tmpdir
        self.process: subprocess.Popen | None = None
        self.control_plane = None

    def release(self) -> None:
        if self.control_plane is not None and self.loop.running:
            try:
                self.loop.run(self.control_plane.stop(grace_s=1), timeout_s=15)
            except Exception:  # the child goes away below whatever happened here
                pass
            self.control_plane = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class LocalPlanes:
    """Starts a data plane child process and a control plane on `loop`; `target` is the Generation API."""

    def __init__(self, model: str | None, loop: EventLoopThread, *, startup_timeout_s: float = 600.0, **options):
        from controlplane.config import ControlPlaneConfig
        from nanoplane.cli import per_launch_token_file
        from nanoplane.default_model import default_model_path
        from dataplane.config import SERVE_CHILD_OVERRIDES, DataPlaneConfig

        dp_options, cp_options = split_options(options)
        model = str(model) if model is not None else default_model_path()
        if not os.path.exists(model):
            raise FileNotFoundError(f"model {model!r} does not exist; give a Hugging Face folder or a .gguf file")
        dp_config = DataPlaneConfig(model=model, **dp_options, **SERVE_CHILD_OVERRIDES)
        dp_config.validate()
        self._resources = _Resources(loop, tempfile.mkdtemp(prefix="nanoplane-llm-"))  # 0700
        self._finalizer = weakref.finalize(self, self._resources.release)
        self.log_path = os.path.join(self._resources.tmpdir, "dataplane.log")
        try:
            token_file = per_launch_token_file(self._resources.tmpdir)
            port = self._start_dataplane(replace(dp_config, auth_token_file=token_file), startup_timeout_s)
            cp_config = ControlPlaneConfig(host="127.0.0.1", port=0, dataplane=f"127.0.0.1:{port}",
                                           dataplane_token_file=token_file, **cp_options)
            cp_config.validate()
            self._resources.control_plane = loop.run(self._start_control_plane(cp_config), startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self.target = f"127.0.0.1:{self._resources.control_plane.port}"

    @property
    def dataplane_pid(self) -> int:
        return self._resources.process.pid

    def _start_dataplane(self, config, timeout_s: float) -> int:
        ready_file = os.path.join(self._resources.tmpdir, "dataplane.port")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("NANOPLANE_LOG_FORMAT", "console")
        with open(self.log_path, "w") as log:
            self._resources.process = subprocess.Popen(dataplane_command(config, ready_file), env=env,
                                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._resources.process.poll() is not None:
                raise RuntimeError(f"the data plane exited with code {self._resources.process.returncode} before it "
                                   f"was ready; the end of its log:\n{self._log_tail()}")
            if os.path.exists(ready_file):
                return int(Path(ready_file).read_text())
            time.sleep(0.05)
        raise TimeoutError(f"the data plane was not ready within {timeout_s:.0f} s; the end of its log:\n"
                           f"{self._log_tail()}")

    @staticmethod
    async def _start_control_plane(config):
        import structlog

        from controlplane.main import start_control_plane
        from proto.logs import configure_logging

        if not structlog.is_configured():  # keep a script's output free of per-request log lines
            configure_logging(level=None if "NANOPLANE_LOG_LEVEL" in os.environ else "warning", json=False)
        return await start_control_plane(config)

    def _log_tail(self, num_chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-num_chars:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self._finalizer()
