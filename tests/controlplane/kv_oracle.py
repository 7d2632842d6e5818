"""A simulated data plane that checks every StepPlan against the control plane's own view.

It holds what a real data plane holds (block tables per slot, how many tokens of each
slot sit in the KV cache, the token it last sampled per slot) and a "KV cache" that
stores, for every cache slot, the (token id, position) written there. Each step it
applies drops, new entries and block writes, writes the run entries' tokens, and then
checks that every position each entry attends to reads back exactly the token the
control plane holds for that sequence at that position: wrong block tables, wrong
prefix-cache hits and wrong chunk offsets all show up as a mismatch.

`tokens_at_slot(slot)` is the control plane's view: the token ids of the sequence it
placed at that slot. `sample(context)` gets the verified context token ids.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from proto.step import RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan, StepResult


class OracleError(AssertionError):
    pass


def context_hash_sampler(vocab_size: int) -> Callable[[np.ndarray], int]:
    """A sampler whose token is a deterministic function of the whole context."""
    def sample(context: np.ndarray) -> int:
        return xxhash.xxh64_intdigest(np.ascontiguousarray(context, dtype="<i8").tobytes()) % vocab_size
    return sample


def rng_sampler(vocab_size: int, seed: int = 0) -> Callable[[np.ndarray], int]:
    rng = np.random.default_rng(seed)
    return lambda context: int(rng.integers(vocab_size))


@dataclass(slots=True)
class SlotState:
    num_kv_tokens: int  # positions 0..num_kv_tokens-1 are in the KV cache
    block_table: list[int] = field(default_factory=list)
    sampled_token: int | None = None  # sampled at position num_kv_tokens, not yet written


class KVOracle:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int,
                 tokens_at_slot: Callable[[int], Sequence[int]], sample: Callable[[np.ndarray], int]):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tokens_at_slot = tokens_at_slot
        self.sample = sample
        self.slots: list[SlotState | None] = [None] * num_slots
        self.kv_token = np.full(num_blocks * block_size, -1, np.int64)
        self.kv_position = np.full(num_blocks * block_size, -1, np.int64)
        self.next_step_id = 0

    def step(self, plan: StepPlan) -> StepResult:
        plan.check()
        self._expect(plan.step_id == self.next_step_id, f"step id {plan.step_id}, expected {self.next_step_id}")
        self.next_step_id += 1
        self._apply_drops(plan)
        self._apply_new(plan)
        self._apply_block_writes(plan)
        return self._run(plan)

    def _expect(self, ok: bool, message: str) -> None:
        if not ok:
            raise OracleError(f"plan {self.next_step_id - 1}: {message}")

    def _state(self, slot: int) -> SlotState:
        self._expect(0 <= slot < len(self.slots) and self.slots[slot] is not None, f"slot {slot} is not occupied")
        return self.slots[slot]

    def _apply_drops(self, plan: StepPlan) -> None:
        self._expect(len(set(plan.drop_slots.tolist())) == len(plan.drop_slots), "a slot is dropped twice")
        for slot in plan.drop_slots.tolist():
            self._state(slot)
            self.slots[slot] = None

    def _apply_new(self, plan: StepPlan) -> None:
        for slot, num_cached in zip(plan.new_slots.tolist(), plan.new_num_cached_tokens.tolist()):
            self._expect(0 <= slot < len(self.slots), f"new slot {slot} out of range")
            self._expect(self.slots[slot] is None, f"new slot {slot} is occupied (not dropped first)")
            self._expect(num_cached % self.block_size == 0, f"slot {slot}: {num_cached} cached tokens, not whole blocks")
            self.slots[slot] = SlotState(num_kv_tokens=num_cached)

    def _apply_block_writes(self, plan: StepPlan) -> None:
        for slot, index, block_id in zip(plan.block_slots.tolist(), plan.block_indices.tolist(), plan.block_ids.tolist()):
            table = self._state(slot).block_table
            self._expect(index == len(table), f"slot {slot}: block write at index {index}, table has {len(table)}")
            self._expect(0 <= block_id < self.num_blocks, f"slot {slot}: block id {block_id} out of range")
            table.append(block_id)

    def _cache_slots(self, state: SlotState, positions: np.ndarray) -> np.ndarray:
        table = np.asarray(state.block_table, np.int64)
        block_index = positions // self.block_size
        self._expect(len(positions) == 0 or block_index[-1] < len(table),
                     f"block table of {len(table)} blocks does not cover position {positions[-1] if len(positions) else 0}")
        return table[block_index] * self.block_size + positions % self.block_size

    def _run(self, plan: StepPlan) -> StepResult:
        run_slots = plan.run_slots.tolist()
        self._expect(len(set(run_slots)) == len(run_slots), "a slot runs twice in one step")
        # Write every entry's KV first, then read: the data plane writes a layer's KV for
        # the whole batch before that layer's attention, so an entry may read blocks
        # another entry of the same step fills (a same-step prefix-cache hit).
        written: list[np.ndarray] = []
        offset = 0
        for slot, n, flags in zip(run_slots, plan.run_num_tokens.tolist(), plan.run_flags.tolist()):
            state = self._state(slot)
            if flags & RUN_TOKENS_IN_PLAN:
                tokens = plan.token_ids[offset:offset + n].astype(np.int64)
                offset += n
            else:
                self._expect(state.sampled_token is not None, f"slot {slot}: decode without a token, but nothing sampled")
                tokens = np.array([state.sampled_token], np.int64)
            positions = np.arange(state.num_kv_tokens, state.num_kv_tokens + n)
            cache_slots = self._cache_slots(state, positions)
            self.kv_token[cache_slots] = tokens
            self.kv_position[cache_slots] = positions
            written.append(cache_slots)
            state.num_kv_tokens += n
            state.sampled_token = None
        written_all = np.concatenate(written) if written else np.zeros(0, np.int64)
        self._expect(len(np.unique(written_all)) == len(written_all), "two tokens written to one cache slot")
        result_slots, result_tokens = [], []
        for slot, flags in zip(run_slots, plan.run_flags.tolist()):
            state = self.slots[slot]
            context = self._read_context(slot, state)
            truth_len = len(self.tokens_at_slot(slot))
            self._expect(bool(flags & RUN_SAMPLE) == (state.num_kv_tokens == truth_len),
                         f"slot {slot}: RUN_SAMPLE={bool(flags & RUN_SAMPLE)} with {state.num_kv_tokens} of {truth_len} tokens computed")
            if flags & RUN_SAMPLE:
                state.sampled_token = int(self.sample(context))
                result_slots.append(slot)
                result_tokens.append(state.sampled_token)
        return StepResult(plan.step_id, np.array(result_slots, "<i4"), np.array(result_tokens, "<i4"))

    def _read_context(self, slot: int, state: SlotState) -> np.ndarray:
        positions = np.arange(state.num_kv_tokens)
        cache_slots = self._cache_slots(state, positions)
        truth = np.asarray(self.tokens_at_slot(slot), np.int64)
        self._expect(len(truth) >= state.num_kv_tokens, f"slot {slot}: {state.num_kv_tokens} tokens in KV, sequence has {len(truth)}")
        got_token, got_position = self.kv_token[cache_slots], self.kv_position[cache_slots]
        bad = np.flatnonzero((got_token != truth[:state.num_kv_tokens]) | (got_position != positions))
        self._expect(len(bad) == 0, "" if len(bad) == 0 else
                     f"slot {slot}: position {bad[0]} reads (token {got_token[bad[0]]}, position {got_position[bad[0]]}), "
                     f"sequence has token {truth[bad[0]]}")
        return got_token


def oracle_for(scheduler, sample: Callable[[np.ndarray], int]) -> KVOracle:
    """An oracle shaped like scheduler's data plane, reading the truth from its slot table."""
    cfg = scheduler.config
    return KVOracle(cfg.num_blocks, cfg.block_size, cfg.max_num_seqs,
                    lambda slot: scheduler.seq_at_slot(slot).token_ids, sample)


def run_step(scheduler, oracle: KVOracle):
    """One engine step, schedule -> data plane -> postprocess; returns the plan and the (seq, token) pairs."""
    plan = scheduler.schedule()
    if plan is None:
        return None, []
    return plan, scheduler.postprocess(plan, oracle.step(plan))
