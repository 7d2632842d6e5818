"""Scheduler + PlanBuilder, driven against the KV oracle: chunking, decodes, preemption, aborts, FIFO."""
import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence, SequenceStatus
from proto.step import RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan
from tests.controlplane.kv_oracle import OracleError, KVOracle, context_hash_sampler, oracle_for, run_step

VOCAB = 1000
EOS = 5000  # outside the sampled range unless a test says otherwise


def make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=None, **kw):
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len or num_blocks * block_size, eos_token_ids=(EOS,), **kw)
    sched = Scheduler(cfg)
    return sched, oracle_for(sched, context_hash_sampler(VOCAB))


def add(sched, seq_id, prompt, max_tokens=4, **sampling):
    seq = Sequence(seq_id, list(prompt), SamplingOptions(max_tokens=max_tokens, **sampling))
    sched.add(seq)
    return seq


def run_all(sched, oracle, max_steps=1000):
    """Steps until everything finished; returns the plans and, per plan, the seq id at each new slot."""
    plans, admitted = [], []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return plans, admitted
        plan = sched.schedule()
        assert plan is not None, "unfinished sequences but nothing scheduled"
        admitted.append([sched.seq_at_slot(s).seq_id for s in plan.new_slots.tolist()])
        sched.postprocess(plan, oracle.step(plan))
        sched.check_invariants()
        plans.append(plan)
    raise AssertionError("did not finish")


def entry(plan: StepPlan, slot: int):
    i = plan.run_slots.tolist().index(slot)
    return int(plan.run_num_tokens[i]), int(plan.run_flags[i])


def test_chunked_prefill_then_decodes():
    sched, oracle = make(max_num_batched_tokens=4)
    prompt = list(range(100, 110))
    seq = add(sched, "a", prompt, max_tokens=4)
    plans, _ = run_all(sched, oracle)
    first, second, third = plans[:3]
    assert first.new_slots.tolist() == [0] and first.new_num_cached_tokens.tolist() == [0]
    assert entry(first, 0) == (4, RUN_TOKENS_IN_PLAN) and first.token_ids.tolist() == prompt[0:4]
    assert entry(second, 0) == (4, RUN_TOKENS_IN_PLAN) and second.token_ids.tolist() == prompt[4:8]
    assert entry(third, 0) == (2, RUN_TOKENS_IN_PLAN | RUN_SAMPLE) and third.token_ids.tolist() == prompt[8:10]
    assert [p.block_indices.tolist() for p in plans[:3]] == [[0], [1], [2]]
    assert len(second.new_slots) == 0 and len(third.new_slots) == 0
    # decodes at positions 10, 11, 12: no token ids; a block write only when position 12 opens block 3
    decodes = plans[3:]
    assert [entry(p, 0) for p in decodes] == [(1, RUN_SAMPLE)] * 3
    assert all(len(p.token_ids) == 0 for p in decodes)
    assert [p.block_indices.tolist() for p in decodes] == [[], [], [3]]
    assert [p.step_id for p in plans] == list(range(len(plans)))
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_completion_tokens == 4


def test_only_blocks_full_after_the_chunk_enter_the_prefix_cache():
    sched, oracle = make(max_num_batched_tokens=7)
    add(sched, "a", range(12), max_tokens=1)
    run_step(sched, oracle)  # tokens 0..6: block 0 full, block 1 holds 3 of 4
    assert len(sched.block_manager.hash_to_block_id) == 1
    run_step(sched, oracle)  # tokens 7..11
    assert len(sched.block_manager.hash_to_block_id) == 3


def test_budget_is_shared_running_first():
    sched, oracle = make(max_num_batched_tokens=8)
    a = add(sched, "a", range(6), max_tokens=3)
    b = add(sched, "b", range(50, 60), max_tokens=3)
    plan, _ = run_step(sched, oracle)
    assert plan.run_slots.tolist() == [0, 1] and plan.run_num_tokens.tolist() == [6, 2]
    assert plan.run_flags.tolist() == [RUN_TOKENS_IN_PLAN | RUN_SAMPLE, RUN_TOKENS_IN_PLAN]
    plan, _ = run_step(sched, oracle)  # a decodes (1), b continues with 7 of its remaining 8
    assert plan.run_num_tokens.tolist() == [1, 7] and plan.run_flags.tolist() == [RUN_SAMPLE, RUN_TOKENS_IN_PLAN]
    assert plan.token_ids.tolist() == list(range(52, 59))
    plan, _ = run_step(sched, oracle)
    assert plan.run_num_tokens.tolist() == [1, 1] and plan.token_ids.tolist() == [59]
    run_all(sched, oracle)
    assert a.num_completion_tokens == 3 and b.num_completion_tokens == 3


def test_prefix_cache_hit_sends_only_the_tail():
    sched, oracle = make()
    prefix = list(range(200, 208))
    a = add(sched, "a", prefix + [1, 2], max_tokens=2)
    b = add(sched, "b", prefix + [3], max_tokens=2)  # admitted in the same step: hits a's just-registered blocks
    plan, _ = run_step(sched, oracle)
    assert plan.new_num_cached_tokens.tolist() == [0, 8]
    assert plan.run_num_tokens.tolist() == [10, 1]
    assert plan.token_ids.tolist() == prefix + [1, 2] + [3]
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_prompt_tokens == 8
    run_all(sched, oracle)
    c = add(sched, "c", prefix + [4, 5, 6, 7, 8], max_tokens=1)  # after both finished: still cached
    plan, _ = run_step(sched, oracle)
    assert plan.new_num_cached_tokens.tolist() == [8] and plan.token_ids.tolist() == [4, 5, 6, 7, 8]
    assert c.is_finished


def test_preempted_sequence_comes_back_with_all_its_tokens():
    big, big_oracle = make(enable_prefix_caching=False)
    ref = [add(big, s, range(i * 10, i * 10 + 6), max_tokens=6) for i, s in enumerate("ab")]
    run_all(big, big_oracle)

    sched, oracle = make(num_blocks=4, max_model_len=16, enable_prefix_caching=False)
    a, b = [add(sched, s, range(i * 10, i * 10 + 6), max_tokens=6) for i, s in enumerate("ab")]
    plans, admitted = run_all(sched, oracle)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert [ids for ids in admitted if ids] == [["a", "b"], ["b"]]
    back = plans[next(i for i, ids in enumerate(admitted) if i and ids)]
    assert back.drop_slots.tolist() == [0]  # a's slot, released when it finished, reused at once
    assert back.new_slots.tolist() == [0] and back.new_num_cached_tokens.tolist() == [0]
    assert entry(back, 0) == (9, RUN_TOKENS_IN_PLAN | RUN_SAMPLE)
    assert back.token_ids.tolist() == b.token_ids[:9]  # 6 prompt + 3 generated before preemption
    assert [p.block_indices.tolist() for p in [back]] == [[0, 1, 2]]
    assert [s.token_ids for s in (a, b)] == [s.token_ids for s in ref]
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_completion_tokens == 6 for s in (a, b))
    assert sched.block_manager.num_free_blocks == 4


def test_preemption_drops_the_slot_in_the_same_plan():
    sched, oracle = make(num_blocks=4, max_num_seqs=2, max_model_len=16, enable_prefix_caching=False)
    add(sched, "a", range(6), max_tokens=6)
    b = add(sched, "b", range(10, 16), max_tokens=6)
    c = add(sched, "c", range(20, 22), max_tokens=1)  # waits for a slot
    for _ in range(4):
        plan, _ = run_step(sched, oracle)
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.slot is None
    assert plan.drop_slots.tolist() == [1] and plan.run_slots.tolist() == [0]
    assert list(sched.waiting) == [b, c]  # the preempted one goes back in front


def test_abort_frees_blocks_now_and_drops_the_slot_next_plan():
    sched, oracle = make()
    add(sched, "a", range(10), max_tokens=8)
    b = add(sched, "b", range(20, 30), max_tokens=8)
    run_step(sched, oracle)
    free_before = sched.block_manager.num_free_blocks
    assert sched.abort("b") is b
    assert sched.block_manager.num_free_blocks == free_before + 3
    assert b.finish_reason is FinishReason.ABORT and b.slot is None and sched.num_running == 1
    plan, _ = run_step(sched, oracle)
    assert plan.drop_slots.tolist() == [1] and plan.run_slots.tolist() == [0]
    assert sched.abort("b") is None and sched.abort("nobody") is None
    w = add(sched, "w", range(5))
    sched.abort("w")  # waiting, no blocks, no slot
    plan, _ = run_step(sched, oracle)
    assert len(plan.drop_slots) == 0
    sched.check_invariants()


def test_result_for_a_sequence_aborted_during_the_step_is_ignored():
    sched, oracle = make()
    add(sched, "a", range(10))
    plan = sched.schedule()
    result = oracle.step(plan)
    sched.abort("a")
    assert sched.postprocess(plan, result) == []
    assert sched.block_manager.num_free_blocks == 64


def test_fifo_head_that_cannot_fit_blocks_later_arrivals():
    sched, oracle = make(num_blocks=8, max_model_len=32)
    a = add(sched, "a", range(20), max_tokens=4)  # 5 blocks, then 6 when decoding
    b = add(sched, "b", range(100, 116), max_tokens=2)  # 4 blocks + 1: does not fit beside a
    c = add(sched, "c", range(200, 203), max_tokens=2)  # 1 block: would fit, must not overtake b
    _, admitted = run_all(sched, oracle)
    assert [ids for ids in admitted if ids] == [["a"], ["b", "c"]]
    assert all(s.num_completion_tokens == s.sampling.max_tokens for s in (a, b, c))


def test_slot_limit_and_reuse_in_the_same_plan():
    sched, oracle = make(max_num_seqs=1)
    a = add(sched, "a", range(5), max_tokens=1)
    add(sched, "b", range(5, 10), max_tokens=1)
    plan, _ = run_step(sched, oracle)
    assert plan.new_slots.tolist() == [0] and a.is_finished
    plan, _ = run_step(sched, oracle)
    assert plan.drop_slots.tolist() == [0] and plan.new_slots.tolist() == [0]


@pytest.mark.parametrize("sampling, reason, completion", [
    ({}, FinishReason.STOP, 1),
    ({"ignore_eos": True}, FinishReason.LENGTH, 3),
    ({"ignore_eos": True, "stop_token_ids": (7,)}, FinishReason.STOP, 1),
])
def test_stop_conditions(sampling, reason, completion):
    cfg = SchedulerConfig(num_blocks=16, block_size=4, max_num_seqs=2, max_num_batched_tokens=64,
                          max_model_len=64, eos_token_ids=(7,))
    sched = Scheduler(cfg)
    oracle = oracle_for(sched, lambda context: 7)
    seq = add(sched, "a", range(5), max_tokens=3, **sampling)
    run_all(sched, oracle)
    assert seq.finish_reason is reason and seq.num_completion_tokens == completion


def test_max_model_len_caps_generation():
    sched, oracle = make(max_model_len=8)
    seq = add(sched, "a", range(6), max_tokens=100)
    run_all(sched, oracle)
    assert seq.num_tokens == 8 and seq.finish_reason is FinishReason.LENGTH


def test_engine_finish_for_a_stop_string_drops_the_slot():
    sched, oracle = make()
    seq = add(sched, "a", range(6), max_tokens=10)
    add(sched, "b", range(16, 22), max_tokens=2)
    run_step(sched, oracle)
    sched.finish(seq, FinishReason.STOP)
    plan, _ = run_step(sched, oracle)
    assert plan.drop_slots.tolist() == [0] and plan.run_slots.tolist() == [1]


def test_generation_stops_at_the_kv_cache_when_the_model_allows_more():
    sched, oracle = make(num_blocks=2, max_model_len=1000)
    seq = add(sched, "a", range(6), max_tokens=100)
    run_all(sched, oracle)
    assert seq.num_tokens == 8 and seq.finish_reason is FinishReason.LENGTH


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(num_blocks=4, block_size=4, max_num_seqs=0, max_num_batched_tokens=8, max_model_len=16)


# the oracle itself must catch broken plans


def test_oracle_rejects_decode_without_tokens_for_a_slot_that_never_sampled():
    oracle = KVOracle(4, 4, 2, lambda slot: [1, 2, 3], context_hash_sampler(VOCAB))
    plan = StepPlan(step_id=0, new_slots=np.array([0], "<i4"), new_num_cached_tokens=np.array([0], "<i4"),
                    new_temperature=np.ones(1, "<f4"), new_top_p=np.ones(1, "<f4"), new_top_k=np.full(1, -1, "<i4"),
                    new_seed=np.zeros(1, "<i8"), new_has_seed=np.zeros(1, "u1"),
                    new_num_prompt_tokens=np.array([3], "<i4"), new_min_p=np.zeros(1, "<f4"),
                    new_repetition_penalty=np.ones(1, "<f4"), new_presence_penalty=np.zeros(1, "<f4"),
                    new_frequency_penalty=np.zeros(1, "<f4"), new_min_tokens=np.zeros(1, "<i4"),
                    new_num_logprobs=np.full(1, -1, "<i4"), new_num_prompt_logprobs=np.full(1, -1, "<i4"),
                    new_num_stop_ids=np.zeros(1, "<i4"),
                    block_slots=np.array([0], "<i4"), block_indices=np.array([0], "<i4"), block_ids=np.array([2], "<i4"),
                    run_slots=np.array([0], "<i4"), run_num_tokens=np.array([1], "<i4"),
                    run_flags=np.array([RUN_SAMPLE], "u1"))
    with pytest.raises(OracleError, match="nothing sampled"):
        oracle.step(plan)


def test_oracle_catches_a_wrong_prefix_cache_hit():
    sched, oracle = make()
    add(sched, "a", range(9), max_tokens=1)
    run_all(sched, oracle)
    add(sched, "b", range(9), max_tokens=1)
    plan = sched.schedule()
    assert plan.new_num_cached_tokens.tolist() == [8]
    plan.block_ids[0] = (plan.block_ids[0] + 5) % 64  # point the cached prefix at the wrong block
    with pytest.raises(OracleError, match="reads"):
        oracle.step(plan)


def test_sequence_appends_to_its_own_copy_of_the_prompt():
    sched, oracle = make()
    prompt = [1, 2, 3]
    seq = Sequence("a", prompt, SamplingOptions(max_tokens=2))
    sched.add(seq)
    run_all(sched, oracle)
    assert prompt == [1, 2, 3] and seq.num_tokens == 5 and seq.completion_token_ids == seq.token_ids[3:]
