"""The data plane's per-slot sampling state follows the control plane's sequences.

A real Scheduler + PlanBuilder (chunked prefill, prefix-cache hits, preemption by
recompute) drives BatchState through the codec, and the KV oracle samples. Before
every sampling row is sampled, its slot's penalty history must equal the sequence's
tokens (prompt set, output counts), its min_tokens bans the sequence's EOS and stop
ids exactly while it is short, and flagged prompt rows predict the right tokens.
"""
from collections import defaultdict

import numpy as np
import torch

from controlplane.serving.logprobs import prompt_logprobs
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import SamplingOptions, Sequence
from dataplane.batch_state import BatchState
from proto.nanoplane.v1 import dataplane_pb2
from proto.step import decode_plan, encode_plan
from tests.controlplane.kv_oracle import context_hash_sampler, oracle_for

VOCAB = 40
EOS = 39
BLOCK = 4


def make_run(num_blocks: int, budget: int, specs: list[tuple[list[int], dict]]):
    sched = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=4,
                                      max_num_batched_tokens=budget, max_model_len=num_blocks * BLOCK,
                                      eos_token_ids=(EOS,)))
    seqs = [Sequence(f"s{i}", prompt, SamplingOptions(**options)) for i, (prompt, options) in enumerate(specs)]
    for seq in seqs:
        sched.add(seq)
    batch = BatchState(4, num_blocks, BLOCK, num_blocks, num_blocks * BLOCK, VOCAB + 1, torch.device("cpu"))
    return sched, seqs, batch, oracle_for(sched, context_hash_sampler(VOCAB))


def check_sampling_rows(sched, batch, inputs) -> int:
    s = inputs.sampling
    banned = {(int(r), int(t)) for r, t in zip(s.ban_rows.tolist(), s.ban_token_ids.tolist())}
    checked = 0
    for row, slot in enumerate(inputs.sampled_slots.tolist()):
        seq = sched.seq_at_slot(slot)
        options = seq.sampling
        if options.uses_penalties:
            prompt = np.zeros(VOCAB + 1, bool)
            prompt[seq.token_ids[:seq.num_prompt_tokens]] = True
            counts = np.bincount(seq.completion_token_ids, minlength=VOCAB + 1)
            assert np.array_equal(batch.sampling.penalties.prompt_mask[slot].numpy(), prompt), seq.seq_id
            assert np.array_equal(batch.sampling.penalties.output_counts[slot].numpy(), counts), seq.seq_id
            checked += 1
        want = set()
        if seq.num_completion_tokens < options.min_tokens:
            want = {(row, t) for t in set(options.stop_token_ids) | ({EOS} if not options.ignore_eos else set())}
        assert {p for p in banned if p[0] == row} == want, seq.seq_id
        assert (row in s.logprob_rows.tolist()) == (options.logprobs is not None)
    return checked


def check_prompt_rows(sched, plan, inputs) -> int:
    p = inputs.prompt_logprobs
    if p is None:
        return 0
    token_slots = np.repeat(plan.run_slots, plan.run_num_tokens)
    for row, target in zip(p.rows.tolist(), p.token_ids.tolist()):
        seq = sched.seq_at_slot(int(token_slots[row]))
        position = int(inputs.positions[row]) + 1  # the row's logits predict the next token
        assert 1 <= position < seq.num_prompt_tokens and seq.token_ids[position] == target
    return len(p.rows)


def drive(sched, batch, oracle, max_steps=2000):
    """Runs to the end; returns the number of penalty rows checked, of prompt rows computed, and
    the prompt logprob entries the control plane kept per sequence (the oracle's logprobs are 0)."""
    num_penalty_checks = num_prompt_rows = 0
    kept = defaultdict(list)
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return num_penalty_checks, num_prompt_rows, kept
        plan = decode_plan(encode_plan(sched.schedule(), dataplane_pb2.StepPlan))
        inputs = batch.apply(plan)
        num_penalty_checks += check_sampling_rows(sched, batch, inputs)
        num_prompt_rows += check_prompt_rows(sched, plan, inputs)
        result = oracle.step(plan)
        n = len(plan.prompt_logprob_token_ids)
        result.prompt_logprobs, result.prompt_logprob_ranks = np.zeros(n, "<f4"), np.ones(n, "<i4")
        for seq, entries in prompt_logprobs(plan, result, sched.seq_at_slot).items():
            kept[seq.seq_id] += entries
        batch.record_sampled(result.slots, torch.from_numpy(result.token_ids.astype(np.int64)))
        sched.postprocess(plan, result)
    raise AssertionError("did not finish")


def test_penalty_history_survives_chunks_prefix_hits_and_preemption():
    rng = np.random.default_rng(0)
    shared = rng.integers(0, VOCAB, 13).tolist()
    penalised = dict(max_tokens=14, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    specs = [(shared + [1, 2], penalised),
             (shared + [3], dict(max_tokens=10, ignore_eos=True)),
             (shared + [5, 6, 7], dict(penalised, presence_penalty=-0.5)),  # a prefix-cache hit with penalties
             (rng.integers(0, VOCAB, 9).tolist(), dict(penalised, repetition_penalty=1.0)),
             (shared[:6], dict(max_tokens=12, presence_penalty=1.0, ignore_eos=True))]
    sched, seqs, batch, oracle = make_run(num_blocks=14, budget=7, specs=specs)
    num_checks, _, _ = drive(sched, batch, oracle)
    assert num_checks > 40
    assert sched.num_preemptions > 0, "the pool should be small enough to preempt"
    assert any(s.num_cached_prompt_tokens for s in seqs[1:3]), "a penalised sequence should hit the prefix cache"


def test_min_tokens_bans_stop_ids_and_eos_until_reached():
    specs = [([1, 2, 3], dict(max_tokens=8, min_tokens=5, stop_token_ids=(7, 8))),
             ([4, 5], dict(max_tokens=6, min_tokens=3, ignore_eos=True, stop_token_ids=(9,))),
             ([6], dict(max_tokens=4, logprobs=2))]
    sched, _, batch, oracle = make_run(num_blocks=32, budget=16, specs=specs)
    drive(sched, batch, oracle)


def test_prompt_logprob_rows_predict_the_next_prompt_token_across_chunks_and_preemption():
    rng = np.random.default_rng(1)
    specs = [(rng.integers(0, VOCAB, 23).tolist(), dict(max_tokens=12, prompt_logprobs=3, ignore_eos=True)),
             (rng.integers(0, VOCAB, 17).tolist(), dict(max_tokens=14, ignore_eos=True)),
             (rng.integers(0, VOCAB, 9).tolist(), dict(max_tokens=14, prompt_logprobs=0, ignore_eos=True))]
    sched, seqs, batch, oracle = make_run(num_blocks=14, budget=5, specs=specs)
    _, num_rows, kept = drive(sched, batch, oracle)
    assert num_rows > 22 + 8, "a preemption during a prefill should make some prompt rows run twice"
    # each prompt token after the first exactly once, in order, though chunks ran again after preemption
    for seq in (seqs[0], seqs[2]):
        assert [e.token.token_id for e in kept[seq.seq_id]] == seq.token_ids[1:seq.num_prompt_tokens]
    assert "s1" not in kept
