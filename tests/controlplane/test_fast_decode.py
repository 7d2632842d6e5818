"""The Scheduler's fast path for plain decodes (`Scheduler.fast_decodes`) gives the very plans, tokens,
counters and block tables of the general path (`_take` for every run), step by step, over random
workloads checked by the KV oracle: block boundaries, prefix-cache hits, chunked prefill, preemption,
n > 1 samples, stop ids, min_tokens, prompt logprobs, penalties, aborts and a data-plane reset,
with and without overlap."""
from dataclasses import fields

import numpy as np
import pytest

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, new_samples
from proto.step import StepPlan
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


def scheduler(seed: int, fast: bool) -> tuple[Scheduler, KVOracle]:
    rng = np.random.default_rng(1000 + seed)
    block_size = int(rng.choice([1, 2, 4, 16]))
    num_blocks = int(rng.integers(60, 200)) // block_size + 8  # often short: preemption
    sched = Scheduler(SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=int(rng.integers(2, 10)),
        max_num_batched_tokens=int(rng.integers(8, 64)), max_model_len=num_blocks * block_size,
        eos_token_ids=(EOS,), enable_prefix_caching=bool(rng.integers(0, 4))))
    sched.fast_decodes = fast
    cfg = sched.config
    oracle = KVOracle(cfg.num_blocks, cfg.block_size, cfg.max_num_seqs,
                      lambda slot: sched.in_flight[-1].seq_at_slot[slot].token_ids, context_hash_sampler(VOCAB))
    return sched, oracle


def run(seed: int, fast: bool, overlap: bool, max_steps: int = 3000):
    """The workload to its end; every plan, and every sequence's state after each step."""
    sched, oracle = scheduler(seed, fast)
    seqs = workload(seed)
    for seq in seqs:
        sched.add(seq)
    rng = np.random.default_rng(2000 + seed)
    plans, states = [], []
    previous = None
    for step in range(max_steps):
        if rng.random() < 0.03:
            sched.abort(seqs[int(rng.integers(len(seqs)))].seq_id)
        if step == 40 and seed % 2:  # the data plane goes away: everything is recomputed
            sched.reset_dataplane()
            oracle = KVOracle(sched.config.num_blocks, sched.config.block_size, sched.config.max_num_seqs,
                              oracle.tokens_at_slot, oracle.sample)
            oracle.next_step_id = sched.plan_builder.next_step_id
            previous = None
        plan, previous = step_once(sched, oracle, previous, overlap)
        plans.append(plan)
        states.append([(s.seq_id, list(s.token_ids), s.num_computed_tokens, s.num_pending_tokens, list(s.block_table),
                        s.num_blocks_sent, s.slot, s.last_token_on_device, s.status, s.finish_reason) for s in seqs])
        if previous is None and not sched.has_unfinished():
            return plans, states, sched
    raise AssertionError("did not finish")


def same_plan(a: StepPlan | None, b: StepPlan | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name))
               and np.asarray(getattr(a, f.name)).dtype == np.asarray(getattr(b, f.name)).dtype for f in fields(a))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("seed", range(30))
def test_fast_decodes_plan_exactly_as_the_general_path(seed, overlap):
    fast_plans, fast_states, fast = run(seed, True, overlap)
    plans, states, general = run(seed, False, overlap)
    assert len(fast_plans) == len(plans)
    for step, (a, b) in enumerate(zip(fast_plans, plans)):
        assert same_plan(a, b), f"step {step}: the plans differ"
        assert fast_states[step] == states[step], f"step {step}: the sequences differ"
    assert (fast.num_preemptions, fast.num_discarded_tokens) == (general.num_preemptions, general.num_discarded_tokens)


def test_the_fast_path_is_taken():
    """Not vacuous: a steady decode step plans most sequences without _take."""
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=512,
                                      max_model_len=1024))
    oracle = KVOracle(64, 16, 8, lambda slot: sched.seq_at_slot(slot).token_ids, context_hash_sampler(VOCAB))
    taken = []
    take = sched._take
    sched._take = lambda seq, n, is_new: taken.append(seq) or take(seq, n, is_new)
    for i in range(8):
        sched.add(new_samples(f"r{i}", list(range(100, 110 + i)), SamplingOptions(max_tokens=20, ignore_eos=True))[0])
    for _ in range(4):
        plan = sched.schedule()
        sched.postprocess(plan, oracle.step(plan))
    taken.clear()
    plan = sched.schedule()
    assert len(plan.run_slots) == 8 and len(taken) <= 2  # those at a block boundary
