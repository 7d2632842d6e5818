"""`nanoplane serve` (the README's command, on a tiny model) and `nanoplane generate`, as real processes."""
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest

from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc

from tests.stack import ROOT, free_port, wait_for_port


def test_serve_then_generate_then_sigterm(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "console"}
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
        dataplane = re.search(r"data plane serving\s+address=(\S+)", (tmp_path / "serve.log").read_text()).group(1)
        with grpc.insecure_channel(dataplane) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                dataplane_pb2_grpc.DataPlaneStub(channel).Describe(dataplane_pb2.DescribeRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "nanoplane.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--model", "--port", "--max-num-seqs", "--num-kv-blocks", "--enable-prefix-caching",
                 "NANOPLANE_DP_MODEL", "NANOPLANE_CP_PORT"):
        assert flag in out.stdout
