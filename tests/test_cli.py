"""`nanoplane serve` (the README's command, on a tiny model) and `nanoplane generate`, as real processes."""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc

from tests.json_logs import json_lines
from tests.stack import ROOT, free_port, wait_for_port


def test_serve_then_generate_then_sigterm(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "nanoplane.cli", "serve", "--model",
                               str(tiny_model_dir("llama")), "--port", str(port), "--num-threads", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, server, 300)
        out = subprocess.run([sys.executable, "-m", "nanoplane.cli", "generate", "Hello", "--target",
                              f"127.0.0.1:{port}", "--max-tokens", "5"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "finish_reason=length" in out.stderr and "completion_tokens=5" in out.stderr
        bad = subprocess.run([sys.executable, "-m", "nanoplane.cli", "generate", "Hello", "--target",
                              f"127.0.0.1:{port}", "--temperature", "-1"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "temperature" in bad.stderr
        # the data plane that serve started takes only its control plane: the per-launch token is serve's secret
        dataplane = next(entry["address"] for entry in json_lines(tmp_path / "serve.log")
                         if entry.get("event") == "data plane serving")
        with grpc.insecure_channel(dataplane) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                dataplane_pb2_grpc.DataPlaneStub(channel).Describe(dataplane_pb2.DescribeRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        busy(f"127.0.0.1:{port}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    log_text = (tmp_path / "serve.log").read_text()
    assert code == 0, log_text[-3000:]
    # the server and its data plane child log to one stream: every line is one JSON object, but for lines
    # native code writes itself (libstdc++'s "terminate called ..." at exit), which must hold no entry
    entries = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert not [line for line in log_text.splitlines() if not line.startswith("{") and '{"' in line]
    assert sum(e["event"] == "request finished" for e in entries) >= NUM_BUSY_REQUESTS


NUM_BUSY_REQUESTS = 24


def busy(target: str) -> None:
    """Many requests at once, so that both planes log at the same time."""
    from client import Client, SamplingParams

    with Client(target) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.generate(f"Request {i}", SamplingParams(max_tokens=4, seed=i)),
                                range(NUM_BUSY_REQUESTS)))
    assert all(r.finish_reason in ("length", "stop") for r in results)


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "nanoplane.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--model", "--port", "--max-num-seqs", "--num-kv-blocks", "--enable-prefix-caching",
                 "NANOPLANE_DP_MODEL", "NANOPLANE_CP_PORT"):
        assert flag in out.stdout
