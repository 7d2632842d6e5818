"""The Scheduler planning one step ahead (overlap), checked by the KV oracle: plans built before the
previous result is back still write and read exactly the right KV, and every sequence ends with the
same tokens as when each result is taken back before the next plan, through chunked prefill,
preemption, n > 1 samples, stop ids and aborts."""
import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence, new_samples
from proto.step import RUN_SAMPLE, StepResult
from tests.controlplane.kv_oracle import KVOracle, context_hash_sampler

VOCAB = 1000
EOS = 7


def make(num_blocks, block_size=4, max_num_seqs=6, max_num_batched_tokens=24):
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=num_blocks * block_size,
                          eos_token_ids=(EOS,))
    sched = Scheduler(cfg)
    return sched, oracle_for(sched)


def oracle_for(sched):
    """A KV oracle whose truth of a slot is the sequence that sat there when the plan was built (with
    overlap it may have finished since): the plan the oracle runs is the newest in flight."""
    cfg = sched.config
    return KVOracle(cfg.num_blocks, cfg.block_size, cfg.max_num_seqs,
                    lambda slot: sched.in_flight[-1].seq_at_slot[slot].token_ids, context_hash_sampler(VOCAB))


def workload(seed: int) -> list[Sequence]:
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(10):
        prompt = rng.integers(100, VOCAB, int(rng.integers(1, 30))).tolist()
        sampling = SamplingOptions(max_tokens=int(rng.integers(1, 14)), n=int(rng.choice([1, 1, 2, 3])),
                                   stop_token_ids=tuple(range(10, 30)) if i % 3 == 0 else (),
                                   min_tokens=int(rng.integers(0, 3)), ignore_eos=i % 4 == 0)
        seqs += new_samples(f"r{i}", prompt, sampling)
    return seqs


def step_once(sched, oracle, previous, overlap: bool):
    """One engine step: schedule, take back the result in flight (before scheduling, without overlap), run
    the plan on the oracle. Returns the plan and the new (plan, result) in flight, or None."""
    if not overlap and previous is not None:
        sched.postprocess(*previous)
        previous = None
    plan = sched.schedule()
    if previous is not None:
        sched.postprocess(*previous)
    sched.check_invariants()
    return plan, ((plan, oracle.step(plan)) if plan is not None else None)


def run(sched, oracle, seqs, overlap: bool, abort_at: dict[int, str] | None = None, max_steps=2000):
    """Steps until all finished. With overlap, plan N+1 is built before N's result is taken back; the
    oracle runs each plan after that (the data plane's order and inputs do not depend on when)."""
    for seq in seqs:
        sched.add(seq)
    previous = None  # (plan, result) in flight
    for step in range(max_steps):
        for seq_id in (abort_at or {}).get(step, ()):
            sched.abort(seq_id)
        _, previous = step_once(sched, oracle, previous, overlap)
        if previous is None and not sched.has_unfinished():
            return
        assert previous is not None or sched.waiting, "unfinished sequences but nothing scheduled"
    raise AssertionError("did not finish")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_blocks", [12, 64], ids=["preempting", "roomy"])
def test_overlap_gives_the_same_tokens_and_discards_at_most_one_per_stop(seed, num_blocks):
    outputs = {}
    for overlap in (False, True):
        sched, oracle = make(num_blocks)
        seqs = workload(seed)
        run(sched, oracle, seqs, overlap)
        outputs[overlap] = [(s.seq_id, s.token_ids, s.finish_reason) for s in seqs]
        num_stopped = sum(s.finish_reason is FinishReason.STOP for s in seqs)
        assert sched.num_discarded_tokens <= (num_stopped if overlap else 0)
        assert sched.block_manager.num_free_blocks == num_blocks and not sched.in_flight
        if num_blocks == 12:
            assert sched.num_preemptions > 0
    assert outputs[True] == outputs[False]


def test_a_sequence_ending_by_length_is_not_run_ahead():
    sched, oracle = make(64)
    seq = Sequence("a", [101, 102, 103], SamplingOptions(max_tokens=3, ignore_eos=True))
    run(sched, oracle, [seq], overlap=True)
    assert seq.num_completion_tokens == 3 and seq.finish_reason is FinishReason.LENGTH
    assert sched.num_discarded_tokens == 0
    assert oracle.next_step_id == 3  # prefill + 2 decodes: no step samples a fourth token


def test_a_stop_id_costs_one_discarded_token_and_the_slot_is_dropped_next():
    sched, _ = make(64)
    seq = Sequence("a", [101, 102, 103], SamplingOptions(max_tokens=50, stop_token_ids=(9,)))
    sched.add(seq)
    slot = (first := sched.schedule()).new_slots[0]
    second = sched.schedule()  # planned before the first result: a decode of the token in flight, no id sent
    assert second.run_slots.tolist() == [slot] and len(second.token_ids) == 0
    assert second.run_flags.tolist() == [RUN_SAMPLE] and seq.num_pending_tokens == 2
    assert sched.postprocess(first, StepResult(first.step_id, np.array([slot], "<i4"), np.array([9], "<i4"))) \
        == [(seq, 9)]
    assert seq.finish_reason is FinishReason.STOP
    assert sched.schedule() is None and sched.slots.pending_drops == [slot]
    assert sched.postprocess(second, StepResult(second.step_id, np.array([slot], "<i4"), np.array([5], "<i4"))) == []
    assert sched.num_discarded_tokens == 1 and seq.completion_token_ids == [9]


def test_abort_while_a_step_is_in_flight_discards_its_token():
    for overlap in (False, True):
        sched, oracle = make(64)
        seqs = workload(0)
        run(sched, oracle, seqs, overlap, abort_at={3: ["r1", "r2#1"], 5: ["r4"]})
        aborted = [s for s in seqs if s.finish_reason is FinishReason.ABORT]
        assert {s.seq_id for s in aborted} <= {"r1", "r2#1", "r4"}
        assert sched.block_manager.num_free_blocks == 64 and not sched.in_flight


def test_reset_dataplane_forgets_what_is_in_flight():
    sched, _ = make(64)
    seqs = workload(1)
    for seq in seqs:
        sched.add(seq)
    sched.schedule()
    sched.schedule()
    assert len(sched.in_flight) == 2
    sched.reset_dataplane()
    assert not sched.in_flight and all(s.num_pending_tokens == 0 for s in seqs)
    oracle = oracle_for(sched)  # a new data plane: empty batch and KV
    oracle.next_step_id = sched.plan_builder.next_step_id
    run(sched, oracle, [], overlap=True)
    assert all(s.is_finished for s in seqs) and sched.block_manager.num_free_blocks == 64
