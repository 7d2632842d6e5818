"""The GPU data plane end to end (marked gpu): Triton attention + CUDA graphs against HF transformers and eager.

Drives the real Scheduler and ModelRunner in one process (the planes' gRPC hop is
covered by the CPU tests); prompts are token ids, so no tokenizer is needed.
"""
import numpy as np
import pytest
import torch

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from tests.hf_reference import hf_greedy
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.gpu

# head_dim 128 and GQA 4 like the real Qwen3 models, small enough for fp32 HF on the CPU
QWEN3_SMALL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   intermediate_size=512, num_hidden_layers=3)


def greedy_tokens(runner: ModelRunner, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    f = runner.facts()
    scheduler = Scheduler(SchedulerConfig(num_blocks=f.num_kv_blocks, block_size=f.block_size,
                                          max_num_seqs=f.max_num_seqs, max_num_batched_tokens=f.max_num_batched_tokens,
                                          max_model_len=f.max_model_len))
    seqs = [Sequence(f"s{i}", p, SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        if plan is not None:
            scheduler.postprocess(plan, runner.execute(plan))
    return [s.completion_token_ids for s in seqs]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-gpu"), vocab_size=4096, seed=0, **QWEN3_SMALL)


def make_runner(path, **options) -> ModelRunner:
    config = DataPlaneConfig(model=str(path), device="cuda", attention_backend="triton", max_num_seqs=32,
                             max_num_batched_tokens=1024, max_model_len=1024, num_kv_blocks=256, **options)
    return ModelRunner(config)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4096, size=int(rng.integers(5, 90))).tolist() for _ in range(n)]


def test_fp32_greedy_with_cuda_graphs_equals_hf(qwen3_dir):
    runner = make_runner(qwen3_dir, dtype="float32")
    assert runner.graphs is not None and runner.graphs.use_graphs and runner.attention_backend == "triton"
    batch = prompts(6, seed=0)
    got = greedy_tokens(runner, batch, max_tokens=24)
    for prompt, tokens in zip(batch, got):
        assert tokens == hf_greedy(qwen3_dir, prompt, 24)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_give_the_same_greedy_tokens_as_eager(qwen3_dir, dtype):
    batch = prompts(20, seed=1)  # 20 sequences: replays the 32-graph padded from 20, then smaller ones
    graphed = greedy_tokens(make_runner(qwen3_dir, dtype=dtype), batch, max_tokens=40)
    eager = greedy_tokens(make_runner(qwen3_dir, dtype=dtype, enforce_eager=True), batch, max_tokens=40)
    assert graphed == eager  # eager decode runs the graphs' padded launch shapes, so even bf16 is bit-identical


def test_kv_cache_sized_from_gpu_memory(qwen3_dir):
    config = DataPlaneConfig(model=str(qwen3_dir), device="cuda", attention_backend="triton", max_num_seqs=8,
                             max_num_batched_tokens=2048, gpu_memory_utilization=0.5, enforce_eager=True)
    runner = ModelRunner(config)
    free, total = torch.cuda.mem_get_info()
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    assert runner.facts().dtype == "bfloat16"
    assert kv_bytes > 0.3 * total  # most of the half it was given
    assert total - free < 0.55 * total
