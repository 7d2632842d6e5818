"""Tensor parallelism on CPU: two ranks talking gloo give one rank's tokens, and a dead rank stops the data plane.

The TP=2 data plane runs as the real `python -m dataplane --tensor-parallel-size 2`
process (rank 0 serves gRPC, rank 1 is its spawned worker); the real Scheduler drives
it through DataPlaneClient, as the control plane's engine does. The reference is a
TP=1 ModelRunner in this process. Small token budgets force chunked prefill, so steps
mix prefill chunks and decodes; some sequences ask for logprobs and prompt logprobs,
whose LM-head gathers every rank must join.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from controlplane.link.dataplane_client import DataPlaneClient, DataPlaneUnavailable
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATAPLANE_OPTIONS = dict(dtype="float32", block_size=16, num_kv_blocks=96, max_num_seqs=8,
                         max_num_batched_tokens=64, max_model_len=256, num_threads=1)


def dataplane_flags(options: dict) -> list[str]:
    return [arg for name, value in options.items() for arg in ("--" + name.replace("_", "-"), str(value))]


def start_dataplane(model: Path, tmp_path: Path, tp_size: int = 2, device: str = "cpu",
                    options: dict = DATAPLANE_OPTIONS, *extra: str) -> tuple[subprocess.Popen, int]:
    ready = tmp_path / "port"
    ready.unlink(missing_ok=True)
    stderr = open(tmp_path / "dataplane.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataplane", "--model", str(model), "--device", device, "--port", "0",
         "--ready-file", str(ready), "--tensor-parallel-size", str(tp_size), *dataplane_flags(options), *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             "NANOPLANE_LOG_FORMAT": "console"},
        stdout=stderr, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the TP={tp_size} data plane did not start:\n{(tmp_path / 'dataplane.log').read_text()}")
        time.sleep(0.1)
    return proc, int(ready.read_text())


def worker_pids(pid: int) -> list[int]:
    """The spawned tensor-parallel ranks among pid's children (multiprocessing's resource tracker is one too)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def generate(step, info, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], np.ndarray]:
    scheduler = Scheduler(SchedulerConfig(num_blocks=info.num_kv_blocks, block_size=info.block_size,
                                          max_num_seqs=info.max_num_seqs,
                                          max_num_batched_tokens=info.max_num_batched_tokens,
                                          max_model_len=info.max_model_len))
    seqs = []
    for i, prompt in enumerate(prompts):
        asks_logprobs = i % 3 == 0
        options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  logprobs=2 if asks_logprobs else None, prompt_logprobs=1 if asks_logprobs else None)
        seqs.append(Sequence(f"s{i}", prompt, options))
        scheduler.add(seqs[-1])
    logprobs = []
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        if plan is not None:
            result = step(plan)
            logprobs.append(np.concatenate([result.logprobs, result.prompt_logprobs]))
            scheduler.postprocess(plan, result)
    return [s.completion_token_ids for s in seqs], np.concatenate(logprobs)


def prompts(n: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(5, 90))).tolist() for _ in range(n)]


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", dict(vocab_size=512)),  # 2 KV heads: one per rank
    ("llama", dict(vocab_size=509, num_key_value_heads=1)),  # one KV head on both ranks; a vocab that does not split evenly
    ("qwen3_moe", dict(vocab_size=512)),  # each rank holds half of every expert
    ("mixtral", dict(vocab_size=512)),
])
def test_two_ranks_give_the_greedy_tokens_of_one(arch, overrides, tmp_path):
    model = save_tiny_model(arch, tmp_path / arch, seed=3, **overrides)
    batch = prompts(7, overrides["vocab_size"], seed=1)
    reference = ModelRunner(DataPlaneConfig(model=str(model), device="cpu", **DATAPLANE_OPTIONS))
    want_tokens, want_logprobs = generate(reference.execute, reference.facts(), batch, max_tokens=12)

    proc, port = start_dataplane(model, tmp_path)
    client = DataPlaneClient(f"127.0.0.1:{port}")
    try:
        info = client.describe(60)
        assert info.num_kv_blocks == DATAPLANE_OPTIONS["num_kv_blocks"]
        client.open_stream()
        got_tokens, got_logprobs = generate(client.step, info, batch, max_tokens=12)
        client.open_stream()  # a new stream resets every rank's batch; the same plans give the same tokens
        again, _ = generate(client.step, info, batch[:2], max_tokens=12)
    finally:
        client.close()
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "dataplane.log").read_text()
    assert got_tokens == want_tokens
    assert again == want_tokens[:2]
    np.testing.assert_allclose(got_logprobs, want_logprobs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-tp"), vocab_size=512, seed=0)


def test_a_dead_rank_stops_the_data_plane_with_a_clear_error(qwen3_model, tmp_path):
    proc, port = start_dataplane(qwen3_model, tmp_path)
    client = DataPlaneClient(f"127.0.0.1:{port}")
    try:
        info = client.describe(60)
        client.open_stream()
        scheduler = Scheduler(SchedulerConfig(num_blocks=info.num_kv_blocks, block_size=info.block_size,
                                              max_num_seqs=info.max_num_seqs,
                                              max_num_batched_tokens=info.max_num_batched_tokens,
                                              max_model_len=info.max_model_len))
        scheduler.add(Sequence("s", [1, 2, 3], SamplingOptions(max_tokens=100, temperature=0.0, ignore_eos=True)))
        for _ in range(3):
            plan = scheduler.schedule()
            scheduler.postprocess(plan, client.step(plan))
        (worker,) = worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(30) == 1
        with pytest.raises(DataPlaneUnavailable):
            client.step(scheduler.schedule())
    finally:
        client.close()
        proc.kill()
    log = (tmp_path / "dataplane.log").read_text()
    assert f"tensor-parallel rank 1 (pid {worker}) exited with code -9" in log


def test_ranks_exit_when_rank_0_dies(qwen3_model, tmp_path):
    proc, _ = start_dataplane(qwen3_model, tmp_path)
    (worker,) = worker_pids(proc.pid)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{worker}").exists() and b"Z" not in Path(f"/proc/{worker}/stat").read_bytes().split()[2:3]:
        assert time.monotonic() < deadline, "the tensor-parallel rank outlived rank 0"
        time.sleep(0.1)
    assert "rank 0 (pid" in (tmp_path / "dataplane.log").read_text()
