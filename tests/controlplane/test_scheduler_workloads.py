"""The Scheduler over random workloads, every plan checked by the KV oracle and every step by
check_invariants: block boundaries, prefix-cache hits, chunked prefill, preemption, n > 1 samples, stop
ids, min_tokens, prompt logprobs, penalties, aborts and a data-plane reset. The oracle's tokens depend on
the context alone, so a sequence's tokens are the same with overlap and without, whatever the schedule."""
import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, new_samples
from tests.controlplane.kv_oracle import KVOracle, context_hash_sampler
from tests.controlplane.test_overlap_scheduler import step_once

VOCAB = 200
EOS = 7


def workload(seed: int):
    rng = np.random.default_rng(seed)
    shared = rng.integers(100, VOCAB, 24).tolist()  # a common prefix: prefix-cache hits
    seqs = []
    for i in range(int(rng.integers(4, 12))):
        prompt = (shared[:int(rng.integers(0, 24))] if i % 2 else []) + rng.integers(8, VOCAB, int(rng.integers(1, 30))).tolist()
        sampling = SamplingOptions(
            max_tokens=int(rng.integers(1, 40)), n=int(rng.choice([1, 1, 1, 2, 3])),
            stop_token_ids=tuple(range(10, 14)) if i % 3 == 0 else (), min_tokens=int(rng.integers(0, 4)),
            ignore_eos=i % 4 == 0, prompt_logprobs=2 if i % 5 == 1 else None,
            repetition_penalty=1.2 if i % 6 == 2 else 1.0)
        seqs += new_samples(f"r{i}", prompt, sampling)
    return seqs


def scheduler(seed: int) -> tuple[Scheduler, KVOracle]:
    rng = np.random.default_rng(1000 + seed)
    block_size = int(rng.choice([1, 2, 4, 16]))
    num_blocks = int(rng.integers(60, 200)) // block_size + 8  # often short: preemption
    sched = Scheduler(SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=int(rng.integers(2, 10)),
        max_num_batched_tokens=int(rng.integers(8, 64)), max_model_len=num_blocks * block_size,
        eos_token_ids=(EOS,), enable_prefix_caching=bool(rng.integers(0, 4))))
    cfg = sched.config
    oracle = KVOracle(cfg.num_blocks, cfg.block_size, cfg.max_num_seqs,
                      lambda slot: sched.in_flight[-1].seq_at_slot[slot].token_ids, context_hash_sampler(VOCAB))
    return sched, oracle


def run(seed: int, overlap: bool, max_steps: int = 3000):
    """The workload to its end; its sequences and the scheduler."""
    sched, oracle = scheduler(seed)
    seqs = workload(seed)
    for seq in seqs:
        sched.add(seq)
    rng = np.random.default_rng(2000 + seed)
    previous = None
    for step in range(max_steps):
        if rng.random() < 0.03:
            sched.abort(seqs[int(rng.integers(len(seqs)))].seq_id)
        if step == 40 and seed % 2:  # the data plane goes away: everything is recomputed
            num_running, num_preemptions = sched.num_running, sched.num_preemptions
            sched.reset_dataplane()
            assert sched.num_running == 0 and sched.num_preemptions == num_preemptions + num_running
            assert all(s.slot is None and not s.block_table and not s.last_token_on_device for s in sched.waiting)
            oracle = KVOracle(sched.config.num_blocks, sched.config.block_size, sched.config.max_num_seqs,
                              oracle.tokens_at_slot, oracle.sample)
            oracle.next_step_id = sched.plan_builder.next_step_id
            previous = None
        _, previous = step_once(sched, oracle, previous, overlap)
        if previous is None and not sched.has_unfinished():
            return seqs, sched
    raise AssertionError("did not finish")


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_with_and_without_overlap(seed):
    with_overlap, _ = run(seed, overlap=True)
    without, _ = run(seed, overlap=False)
    for a, b in zip(with_overlap, without):
        if FinishReason.ABORT not in (a.finish_reason, b.finish_reason):  # aborts fall on other steps
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason, a.seq_id


def test_a_decode_step_sends_only_the_run_columns():
    """A steady decode step: one entry per sequence, no token ids (they are on the device), no new slots,
    no block writes but at a block boundary."""
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=512,
                                      max_model_len=1024))
    oracle = KVOracle(64, 16, 8, lambda slot: sched.seq_at_slot(slot).token_ids, context_hash_sampler(VOCAB))
    for i in range(8):
        sched.add(new_samples(f"r{i}", list(range(100, 110 + i)), SamplingOptions(max_tokens=20, ignore_eos=True))[0])
    for _ in range(4):
        plan = sched.schedule()
        sched.postprocess(plan, oracle.step(plan))
    plan = sched.schedule()
    assert len(plan.run_slots) == 8 and len(plan.token_ids) == 0 and len(plan.new_slots) == 0
    assert len(plan.block_ids) <= 2  # those that crossed a block boundary
