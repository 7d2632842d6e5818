"""n > 1 samples through Scheduler + PlanBuilder + KV oracle: they share the prompt's full blocks
(fewer blocks than n independent sequences), wait for sample 0's prompt, and all finish; and the plan
carries what the data plane needs for penalties, min_tokens and prompt logprobs."""
import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence, SequenceStatus, new_samples
from proto.step import RUN_PROMPT_LOGPROBS, StepResult
from tests.controlplane.kv_oracle import context_hash_sampler, oracle_for

VOCAB = 1000
EOS = 5000
BLOCK = 4


def make(num_blocks=64, budget=64, prefix_caching=True, num_slots=8):
    sched = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=num_slots,
                                      max_num_batched_tokens=budget, max_model_len=num_blocks * BLOCK,
                                      eos_token_ids=(EOS,), enable_prefix_caching=prefix_caching))
    return sched, oracle_for(sched, context_hash_sampler(VOCAB))


def run(sched, oracle, on_step=lambda plan: None, max_steps=1000):
    """Steps to the end; returns the most blocks in use at once."""
    peak = 0
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return peak
        plan = sched.schedule()
        assert plan is not None
        peak = max(peak, sched.block_manager.num_blocks - sched.block_manager.num_free_blocks)
        on_step(plan)
        sched.postprocess(plan, oracle.step(plan))
        sched.check_invariants()
    raise AssertionError("did not finish")


PROMPT = list(range(100, 130))  # 30 tokens: 7 full blocks and a tail of 2
N, MAX_TOKENS = 4, 6


def test_samples_share_the_prompt_blocks_and_use_fewer_blocks_than_independent_sequences():
    sched, oracle = make()
    samples = new_samples("r", PROMPT, SamplingOptions(max_tokens=MAX_TOKENS, n=N, seed=7))
    for seq in samples:
        sched.add(seq)
    peak_shared = run(sched, oracle)

    alone, alone_oracle = make(prefix_caching=False)
    for i in range(N):
        alone.add(Sequence(f"s{i}", PROMPT, SamplingOptions(max_tokens=MAX_TOKENS)))
    peak_alone = run(alone, alone_oracle)

    per_sequence = -(-(len(PROMPT) + MAX_TOKENS) // BLOCK)  # 9 blocks
    shared = (len(PROMPT) - 1) // BLOCK  # 7: all full blocks before the one holding the last prompt token
    assert peak_alone == N * per_sequence
    assert peak_shared == shared + N * (per_sequence - shared) < peak_alone
    assert [s.num_cached_prompt_tokens for s in samples] == [0] + [shared * BLOCK] * (N - 1)
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_completion_tokens == MAX_TOKENS for s in samples)
    assert [s.sampling.seed for s in samples] == [7, 8, 9, 10]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_later_samples_wait_until_the_first_has_computed_its_prompt():
    sched, oracle = make(budget=8)  # the prompt takes four chunks
    samples = new_samples("r", PROMPT, SamplingOptions(max_tokens=MAX_TOKENS, n=3))
    for seq in samples:
        sched.add(seq)
    admitted_at, steps = {}, []

    def on_step(plan):
        for slot in plan.new_slots.tolist():
            admitted_at.setdefault(sched.seq_at_slot(slot).index, len(steps))
        steps.append(plan)

    run(sched, oracle, on_step)
    assert admitted_at[0] == 0 and admitted_at[1] >= 3 and admitted_at[2] >= 3
    assert [s.num_cached_prompt_tokens for s in samples] == [0, 28, 28]


def test_a_preempted_leader_does_not_block_its_samples_forever():
    sched, oracle = make(num_blocks=12, budget=8, num_slots=3)
    samples = new_samples("r", PROMPT, SamplingOptions(max_tokens=10, n=3))
    for seq in samples:
        sched.add(seq)
    run(sched, oracle)
    assert all(s.status is SequenceStatus.FINISHED for s in samples)
    assert sched.num_preemptions > 0


def test_stop_ids_are_ignored_before_min_tokens_and_counted_after():
    sched, oracle = make()
    seq = Sequence("a", [1, 2, 3], SamplingOptions(max_tokens=10, min_tokens=3, stop_token_ids=(7,)))
    sched.add(seq)
    plan = sched.schedule()
    assert plan.new_min_tokens.tolist() == [3] and sorted(plan.stop_ids.tolist()) == [7, EOS]
    for token in (7, EOS, 7):  # the data plane would ban these; if one came, it must not stop the sequence
        sched.postprocess(plan, oracle_result(plan, token))
        assert seq.finish_reason is None
        plan = sched.schedule()
    sched.postprocess(plan, oracle_result(plan, 7))
    assert seq.finish_reason is FinishReason.STOP and seq.stop_token_id == 7 and seq.num_completion_tokens == 4


def oracle_result(plan, token):
    return StepResult(plan.step_id, plan.run_slots.copy(), np.array([token], "<i4"))


def test_plan_carries_cached_tokens_of_penalised_sequences_and_flags_prompt_logprob_chunks():
    sched, oracle = make(budget=12)
    first = Sequence("a", PROMPT, SamplingOptions(max_tokens=2))
    sched.add(first)
    run(sched, oracle)
    again = Sequence("b", PROMPT + [7], SamplingOptions(max_tokens=2, frequency_penalty=0.5))
    plain = Sequence("c", PROMPT + [8], SamplingOptions(max_tokens=2))
    sched.add(again)
    sched.add(plain)
    plan = sched.schedule()
    assert plan.new_num_cached_tokens.tolist() == [28, 28]
    assert plan.cached_token_ids.tolist() == PROMPT[:28]  # only the penalised one's
    assert plan.new_num_prompt_tokens.tolist() == [31, 31]
    sched.postprocess(plan, oracle.step(plan))
    run(sched, oracle)

    wants = Sequence("d", PROMPT, SamplingOptions(max_tokens=2, prompt_logprobs=1))
    sched.add(wants)
    plan = sched.schedule()
    assert plan.new_num_cached_tokens.tolist() == [0], "prompt logprobs need every prompt token computed"
    assert plan.run_flags[0] & RUN_PROMPT_LOGPROBS and plan.prompt_logprob_counts.tolist() == [12]
    assert plan.prompt_logprob_token_ids.tolist() == PROMPT[1:13]  # the last is the next chunk's first


@pytest.mark.parametrize("n", [1, 3])
def test_samples_of_a_request(n):
    samples = new_samples("req", [1, 2], SamplingOptions(max_tokens=2, n=n, prompt_logprobs=2))
    assert [s.seq_id for s in samples] == ["req", "req#1", "req#2"][:n]
    assert all(s.request_id == "req" and s.index == i for i, s in enumerate(samples))
    assert [s.sampling.prompt_logprobs for s in samples] == [2] + [None] * (n - 1)
    assert [s.sampling.seed for s in samples] == [None] * n
