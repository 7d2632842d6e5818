"""ModelRunner.launch/result with steps in flight gives what one execute at a time gives.

A real Scheduler plans one step ahead, as the control plane does with overlap: plan N+1 is built
before N's result is back, so its decodes carry no token ids and read the ids N sampled, still on
the device. The runner launches N+1 before waiting for N. Replaying the same plans one execute at
a time on a fresh runner must give bit-identical results (tokens, logprobs, prompt logprobs; the
unseeded rows too, since the generator is drawn in the same order); and the greedy and seeded
sequences must end with the tokens of a run without overlap. On CUDA (marked gpu) the same runs
with CUDA graphs and eagerly, and a steady decode launch must not synchronise with the device.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from proto.step import RESULT_ARRAYS, StepResult
from tests.tiny_models import save_tiny_model

VOCAB = 512
# cuda: Triton attention and CUDA graphs for decode; cuda-eager: the same kernels without graphs
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda-eager", marks=pytest.mark.gpu)]
OPTIONS = [
    dict(temperature=0.0),
    dict(temperature=0.0, logprobs=3, prompt_logprobs=2),
    dict(temperature=0.9, top_k=20, top_p=0.9, seed=11),
    dict(temperature=0.7, min_p=0.05, seed=5, logprobs=1),
    dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
    dict(temperature=1.0),  # unseeded: its tokens depend on the batch's draw order
    dict(temperature=0.0, min_tokens=6, stop_token_ids=(3, 4)),
    dict(temperature=0.8, top_k=5, seed=2, repetition_penalty=0.9),
]
REPRODUCIBLE = [i for i, o in enumerate(OPTIONS) if o["temperature"] == 0.0 or "seed" in o]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-pipelined"), vocab_size=VOCAB, seed=0)


def make_runner(model_dir, device: str) -> ModelRunner:
    return ModelRunner(DataPlaneConfig(
        model=str(model_dir), device=device.removesuffix("-eager"), enforce_eager=device.endswith("-eager"),
        dtype="float32", block_size=16, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=48,
        max_model_len=256, num_threads=1, seed=0))


def make_scheduler(runner: ModelRunner) -> Scheduler:
    f = runner.facts()
    return Scheduler(SchedulerConfig(num_blocks=f.num_kv_blocks, block_size=f.block_size, max_num_seqs=f.max_num_seqs,
                                     max_num_batched_tokens=f.max_num_batched_tokens, max_model_len=f.max_model_len))


def workload(num_seqs: int = 10) -> list[Sequence]:
    rng = np.random.default_rng(0)
    return [Sequence(f"s{i}", rng.integers(5, VOCAB, int(rng.integers(3, 70))).tolist(),
                     SamplingOptions(max_tokens=int(rng.integers(8, 30)), ignore_eos=True, **OPTIONS[i % len(OPTIONS)]))
            for i in range(num_seqs)]


def run_pipelined(runner: ModelRunner, depth: int) -> tuple[list, list[StepResult], dict[str, list[int]]]:
    """The control plane's overlap loop with `depth` steps launched and unanswered at most."""
    scheduler = make_scheduler(runner)
    seqs = workload()
    for seq in seqs:
        scheduler.add(seq)
    plans, results, in_flight = [], [], deque()
    while scheduler.has_unfinished() or in_flight:
        plan = scheduler.schedule() if len(in_flight) < depth else None
        if plan is not None:
            plans.append(plan)
            in_flight.append((plan, runner.launch(plan)))
        if in_flight and (plan is None or len(in_flight) == depth):
            done, pending = in_flight.popleft()
            results.append(pending.result())
            scheduler.postprocess(done, results[-1])
    return plans, results, {s.seq_id: s.completion_token_ids for s in seqs}


def run_sequential(runner: ModelRunner) -> dict[str, list[int]]:
    scheduler = make_scheduler(runner)
    seqs = workload()
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        scheduler.postprocess(plan, runner.execute(plan))
    return {s.seq_id: s.completion_token_ids for s in seqs}


def assert_same_results(got: list[StepResult], want: list[StepResult]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.step_id == b.step_id
        for name in RESULT_ARRAYS:
            assert np.array_equal(getattr(a, name), getattr(b, name)), (a.step_id, name)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_steps_in_flight_equal_one_execute_at_a_time(model_dir, device, depth):
    """depth 3 is more than the runner's pinned buffers: the oldest step's outputs must survive it."""
    plans, results, _ = run_pipelined(make_runner(model_dir, device), depth)
    assert sum(not (p.run_flags & 2).any() for p in plans) > 10, "steady decode steps should carry no token ids"
    assert any(len(r.logprobs) for r in results) and any(len(r.prompt_logprobs) for r in results)
    replay = make_runner(model_dir, device)
    assert_same_results([replay.execute(p) for p in plans], results)


@pytest.mark.parametrize("device", DEVICES)
def test_overlapped_run_ends_with_the_tokens_of_a_run_without_overlap(model_dir, device):
    _, _, overlapped = run_pipelined(make_runner(model_dir, device), depth=2)
    plain = run_sequential(make_runner(model_dir, device))
    for i in REPRODUCIBLE:
        seq_id = f"s{i}"
        assert overlapped[seq_id] == plain[seq_id], seq_id
    assert all(len(tokens) >= 8 for tokens in overlapped.values())


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda-eager"])
def test_steady_decode_launch_does_not_wait_for_the_device(model_dir, device):
    """Any host sync in launch (.item(), .tolist(), nonzero, a pageable copy) raises under the debug mode.
    Penalties are left out: PenaltyState still copies its row indices from pageable memory."""
    runner = make_runner(model_dir, device)
    scheduler = make_scheduler(runner)
    rng = np.random.default_rng(1)
    options = [o for o in OPTIONS if "repetition_penalty" not in o]
    for i in range(8):
        scheduler.add(Sequence(f"s{i}", rng.integers(5, VOCAB, 20).tolist(),
                               SamplingOptions(max_tokens=40, ignore_eos=True, **options[i % len(options)])))
    in_flight = deque()
    for step in range(30):
        plan = scheduler.schedule()
        assert plan is not None
        torch.cuda.set_sync_debug_mode("error" if step >= 10 else "default")  # prompts are done by step 10
        try:
            in_flight.append((plan, runner.launch(plan)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if len(in_flight) == 2:
            done, pending = in_flight.popleft()
            scheduler.postprocess(done, pending.result())
