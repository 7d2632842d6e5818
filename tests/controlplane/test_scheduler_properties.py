"""Random workloads through Scheduler + PlanBuilder + KV oracle: no leaks, right tokens, everyone finishes.

Prompts share random prefixes (prefix-cache hits, some in the same step), the KV pool
is barely big enough for the longest sequence (preemption), budgets are small
(chunked prefill), and sequences are aborted between steps. The oracle's sampled
token is a function of the context, so every sequence's tokens must equal those of
the same workload run with a huge pool and budget.
"""
from dataclasses import dataclass

from hypothesis import event, given, settings, strategies as st

from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence
from tests.controlplane.kv_oracle import context_hash_sampler, oracle_for, run_step

VOCAB = 50
EOS = VOCAB  # never sampled
MAX_STEPS = 5000


@dataclass
class Workload:
    block_size: int
    prompts: list[list[int]]
    max_tokens: list[int]
    extra_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    aborts: dict[int, list[int]]  # step -> indices of sequences to abort before it

    @property
    def max_model_len(self) -> int:
        return self.num_blocks_needed * self.block_size

    @property
    def num_blocks_needed(self) -> int:
        longest = max(len(p) + m for p, m in zip(self.prompts, self.max_tokens))
        return -(-longest // self.block_size)


@st.composite
def workloads(draw) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4]))
    tokens = st.integers(0, 7)  # a small alphabet: equal prompts and equal blocks happen often
    prefixes = draw(st.lists(st.lists(tokens, min_size=block_size, max_size=3 * block_size), min_size=1, max_size=3))
    n = draw(st.integers(1, 10))
    prompts = [draw(st.sampled_from(prefixes)) + draw(st.lists(tokens, min_size=1, max_size=10)) for _ in range(n)]
    return Workload(
        block_size=block_size,
        prompts=prompts,
        max_tokens=draw(st.lists(st.integers(1, 12), min_size=n, max_size=n)),
        extra_blocks=draw(st.integers(0, 8)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 24)),
        enable_prefix_caching=draw(st.booleans()),
        aborts=draw(st.dictionaries(st.integers(0, 30), st.lists(st.integers(0, n - 1), max_size=2), max_size=3)),
    )


def run(w: Workload, num_blocks: int, max_num_batched_tokens: int, aborts: dict[int, list[int]]):
    """Drives the workload to the end, checking invariants every step; returns the sequences and the aborted ids."""
    sched = Scheduler(SchedulerConfig(
        num_blocks=num_blocks, block_size=w.block_size, max_num_seqs=w.max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=w.max_model_len,
        eos_token_ids=(EOS,), enable_prefix_caching=w.enable_prefix_caching))
    oracle = oracle_for(sched, context_hash_sampler(VOCAB))
    seqs = [Sequence(f"s{i}", list(p), SamplingOptions(max_tokens=m)) for i, (p, m) in enumerate(zip(w.prompts, w.max_tokens))]
    for seq in seqs:
        sched.add(seq)
    aborted = set()
    for step in range(MAX_STEPS):
        for i in aborts.get(step, []):
            if sched.abort(seqs[i].seq_id) is not None:
                aborted.add(seqs[i].seq_id)
        if not sched.has_unfinished():
            break
        plan, _ = run_step(sched, oracle)
        assert plan is not None, "unfinished sequences but nothing scheduled"
        sched.check_invariants()
    assert not sched.has_unfinished(), "did not finish"
    bm = sched.block_manager
    assert bm.num_free_blocks == num_blocks
    bm.check_invariants([])
    assert sorted(sched.slots.free) == list(range(w.max_num_seqs))
    return seqs, aborted


@settings(max_examples=400, deadline=None)
@given(workloads())
def test_random_workloads_finish_with_the_reference_tokens(w: Workload):
    seqs, aborted = run(w, w.num_blocks_needed + w.extra_blocks, w.max_num_batched_tokens, w.aborts)
    reference, _ = run(w, w.num_blocks_needed * len(w.prompts) + 64, 10_000, {})

    for seq, ref in zip(seqs, reference):
        if seq.seq_id in aborted:
            assert seq.finish_reason is FinishReason.ABORT
            assert seq.token_ids == ref.token_ids[:seq.num_tokens]
        else:
            assert seq.finish_reason is FinishReason.LENGTH
            assert seq.num_completion_tokens == seq.sampling.max_tokens
            assert seq.token_ids == ref.token_ids
        assert ref.num_preemptions == 0
    preempted = [s for s in seqs if s.num_preemptions and s.seq_id not in aborted]
    event("a preempted sequence finished" if preempted else "no preemption")
    event("prefix-cache hit" if any(s.num_cached_prompt_tokens for s in seqs) else "no prefix-cache hit")
    event("chunked" if w.max_num_batched_tokens < max(map(len, w.prompts)) else "not chunked")
