"""Tensor parallelism on two GPUs: TP=2 (NCCL) gives TP=1's greedy tokens on a random Qwen3-0.6B-architecture model.

fp32, random weights drawn per checkpoint tensor from a seed (dataplane/loader.py), so both
sizes hold the same model. Both data planes are real processes driven by the real Scheduler
(tests/test_tensor_parallel.py's helpers); CUDA graphs on (the default) and off.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.throughput import QWEN3_0_6B
from controlplane.link.dataplane_client import DataPlaneClient
from tests.test_tensor_parallel import generate, prompts, start_dataplane

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

OPTIONS = dict(dtype="float32", load_format="dummy", block_size=16, num_kv_blocks=512, max_num_seqs=16,
               max_num_batched_tokens=512, max_model_len=1024)


def run(model_dir, tmp_path, tp_size: int, eager: bool, batch) -> tuple[list[list[int]], np.ndarray]:
    proc, port = start_dataplane(model_dir, tmp_path, tp_size, "cuda", OPTIONS,
                                 *(["--enforce-eager"] if eager else []))
    client = DataPlaneClient(f"127.0.0.1:{port}")
    try:
        info = client.describe(600)
        client.open_stream()
        return generate(client.step, info, batch, max_tokens=32)
    finally:
        client.close()
        proc.terminate()
        assert proc.wait(60) == 0, (tmp_path / "dataplane.log").read_text()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_two_gpus_give_the_greedy_tokens_of_one(eager, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_0_6B))
    batch = prompts(12, 10_000, seed=5)
    want_tokens, want_logprobs = run(tmp_path, tmp_path, 1, eager, batch)
    got_tokens, got_logprobs = run(tmp_path, tmp_path, 2, eager, batch)
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got_logprobs, want_logprobs, rtol=1e-3, atol=1e-3)
