"""Seeded sampling with every option on at once through the real Scheduler and ModelRunner: the same
tokens after preemption, and (marked gpu) the same tokens and logprobs on CUDA as on the CPU in float32."""
import numpy as np
import pytest

from controlplane.serving.logprobs import prompt_logprobs, sampled_logprobs
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from tests.tiny_models import save_tiny_model

VOCAB = 4096
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-sampling"), vocab_size=VOCAB, seed=0)


def make_runner(path, device: str, num_kv_blocks: int) -> ModelRunner:
    backend = "triton" if device == "cuda" else "torch"
    return ModelRunner(DataPlaneConfig(model=str(path), device=device, dtype="float32", attention_backend=backend,
                                       max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256,
                                       num_kv_blocks=num_kv_blocks, num_threads=2 if device == "cpu" else 0))


def options(i: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=24, ignore_eos=True, seed=1000 + i, temperature=0.8, top_p=0.95,
                           top_k=200 if i % 2 else -1, min_p=0.01, repetition_penalty=1.0 + 0.1 * i,
                           presence_penalty=0.3, frequency_penalty=0.2 * i, logprobs=3,
                           prompt_logprobs=2 if i == 0 else None)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, 24).tolist() for _ in range(5)]


def run(runner: ModelRunner, batch: list[list[int]]):
    """Runs every prompt to the end; returns per prompt (tokens, logprob entries, prompt logprob entries)."""
    f = runner.facts()
    scheduler = Scheduler(SchedulerConfig(num_blocks=f.num_kv_blocks, block_size=f.block_size,
                                          max_num_seqs=f.max_num_seqs, max_num_batched_tokens=f.max_num_batched_tokens,
                                          max_model_len=f.max_model_len))
    seqs = [Sequence(f"s{i}", p, options(i)) for i, p in enumerate(batch)]
    logprobs = {s: [] for s in seqs}
    prompt = {s: [] for s in seqs}
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        if plan is None:
            continue
        result = runner.execute(plan)
        for seq, entries in prompt_logprobs(plan, result, scheduler.seq_at_slot).items():
            prompt[seq] += entries
        at_rows = [scheduler.seq_at_slot(s) for s in result.slots.tolist()]
        for seq, entry in sampled_logprobs(result, at_rows).items():
            logprobs[seq].append(entry)
        scheduler.postprocess(plan, result)
    return [(s.completion_token_ids, logprobs[s], prompt[s]) for s in seqs], scheduler.num_preemptions


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_with_penalties_survives_preemption(model_dir, device):
    batch = prompts()
    roomy, roomy_preemptions = run(make_runner(model_dir, device, num_kv_blocks=64), batch)
    tight, tight_preemptions = run(make_runner(model_dir, device, num_kv_blocks=8), batch)  # 128 tokens for 240
    assert roomy_preemptions == 0 < tight_preemptions
    assert [r[0] for r in tight] == [r[0] for r in roomy]
    assert len(roomy[0][2]) == len(batch[0]) - 1 and all(len(r[1]) == 24 for r in roomy)


@pytest.mark.gpu
def test_cuda_samples_the_same_tokens_and_logprobs_as_the_cpu(model_dir):
    batch = prompts()
    cpu, _ = run(make_runner(model_dir, "cpu", num_kv_blocks=64), batch)
    cuda, _ = run(make_runner(model_dir, "cuda", num_kv_blocks=64), batch)
    assert [r[0] for r in cuda] == [r[0] for r in cpu]
    for (_, cpu_lp, cpu_prompt), (_, cuda_lp, cuda_prompt) in zip(cpu, cuda):
        for a, b in zip(cpu_lp + cpu_prompt, cuda_lp + cuda_prompt):
            assert a.token.token_id == b.token.token_id
            assert a.token.logprob == pytest.approx(b.token.logprob, abs=1e-3)
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
