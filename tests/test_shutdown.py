"""Graceful shutdown: SIGTERM to `nanoplane serve` during a stream lets the stream finish, refuses new calls,
reports NOT_SERVING, then stops both planes; a stream longer than the grace period ends with "abort".
The serve run's JSON logs also show how one request is followed across the planes."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Client, NanoplaneError, SamplingParams
from tests.json_logs import json_lines
from tests.stack import ROOT, InProcessStack, free_port, wait_for_port

LONG = SamplingParams(max_tokens=480, temperature=0, ignore_eos=True)


def dataplane_pids(model: str) -> list[int]:
    """Processes running `python -m dataplane` for this model (the child of `nanoplane serve`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"dataplane" in argv and model.encode() in argv:
            pids.append(int(entry.name))
    return pids


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.fixture
def serve_process(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("qwen3"))
    port, log_path = free_port(), tmp_path / "serve.log"
    others = set(dataplane_pids(model))  # of earlier tests, if any were left
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanoplane.cli", "serve", "--model", model, "--device", "cpu", "--num-threads", "1",
             "--num-kv-blocks", "64", "--port", str(port), "--shutdown-grace-s", "30"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, 120)
        yield proc, f"127.0.0.1:{port}", lambda: set(dataplane_pids(model)) - others, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in set(dataplane_pids(model)) - others:
            os.kill(pid, signal.SIGKILL)


def test_sigterm_lets_the_stream_finish_then_stops_both_planes(serve_process):
    proc, target, serves_dataplane, log_path = serve_process
    with Client(target, timeout_s=60) as client:
        stream = client.generate_stream("Once upon a time", LONG, request_id="trace-me")
        first = next(stream)
        (dataplane_pid,) = serves_dataplane()
        # the data plane is held still, so the stream is surely in flight when the late call comes
        os.kill(dataplane_pid, signal.SIGSTOP)
        try:
            proc.send_signal(signal.SIGTERM)
            while health(target) != health_pb2.HealthCheckResponse.NOT_SERVING:
                time.sleep(0.01)
            with pytest.raises(NanoplaneError) as refused:
                client.generate("too late", SamplingParams(max_tokens=2))
        finally:
            os.kill(dataplane_pid, signal.SIGCONT)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.message

        deltas = [first, *stream]
    assert deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in deltas) == LONG.max_tokens
    assert proc.wait(30) == 0
    assert not serves_dataplane()

    logs = json_lines(log_path)
    mine = [e for e in logs if e.get("request_id") == "trace-me"]
    assert {"request accepted", "sequence entered slot", "request finished"} <= {e["event"] for e in mine}
    entered = next(e for e in mine if e["event"] == "sequence entered slot")
    batch = [e for e in logs if e["event"] == "batch changed" and e["step_id"] == entered["step_id"]]
    assert len(batch) == 1 and entered["slot"] in batch[0]["new_slots"]  # the join of docs/operations.md
    events = [e["event"] for e in logs]
    assert events.index("shutting down: not serving, finishing in-flight calls") < events.index("control plane stopped")
    assert "data plane stopped" in events


def test_streams_still_running_when_the_grace_period_ends_are_aborted(tiny_model_dir):
    stack = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64)
    try:
        deltas, errors = [], []

        def consume():
            try:
                deltas.extend(stack.client.generate_stream("Once upon a time", LONG))
            except Exception as e:  # reported below
                errors.append(e)

        reader = threading.Thread(target=consume)
        reader.start()
        while not deltas:
            time.sleep(0.005)
        asyncio.run_coroutine_threadsafe(stack.control_plane.stop(grace_s=0.2), stack.loop).result(30)
        reader.join(10)
        assert not errors and deltas[-1].finish_reason == "abort"
        assert 0 < sum(len(d.token_ids) for d in deltas) < LONG.max_tokens
        assert deltas[-1].usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    finally:
        stack.client.close()
        stack.loop.call_soon_threadsafe(stack.loop.stop)
        stack.dp_server.stop(0)
