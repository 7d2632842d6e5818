"""Turns one scheduling decision into a delta `proto.step.StepPlan` for the data plane.

The Scheduler decides who runs and how many tokens; this module only encodes that
decision, telling the data plane what it does not already hold: new slots with
their sampling params, block-table entries it has not seen, and token ids except
for decodes of a token it sampled itself. It records what was sent
(`Sequence.num_blocks_sent`) so the next plan sends only the difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlplane.sequence import Sequence
from proto.step import PLAN_ARRAYS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan


@dataclass(slots=True)
class ScheduledRun:
    seq: Sequence
    start: int  # seq.num_computed_tokens before this step's chunk: the KV the data plane already holds
    num_tokens: int
    is_new: bool  # the sequence got its slot this step


def _array(name: str, values) -> np.ndarray:
    return np.asarray(values, dtype=PLAN_ARRAYS[name])


class PlanBuilder:
    def __init__(self) -> None:
        self.next_step_id = 0

    def build(self, drop_slots: list[int], runs: list[ScheduledRun]) -> StepPlan:
        new = [r for r in runs if r.is_new]
        plan = StepPlan(
            step_id=self.next_step_id,
            drop_slots=_array("drop_slots", drop_slots),
            new_slots=_array("new_slots", [r.seq.slot for r in new]),
            new_num_cached_tokens=_array("new_num_cached_tokens", [r.start for r in new]),
            new_temperature=_array("new_temperature", [r.seq.sampling.temperature for r in new]),
            new_top_p=_array("new_top_p", [r.seq.sampling.top_p for r in new]),
            new_top_k=_array("new_top_k", [r.seq.sampling.top_k for r in new]),
            new_seed=_array("new_seed", [r.seq.sampling.seed or 0 for r in new]),
            new_has_seed=_array("new_has_seed", [r.seq.sampling.seed is not None for r in new]),
        )
        self._add_block_writes(plan, runs)
        self._add_runs(plan, runs)
        self.next_step_id += 1
        return plan

    @staticmethod
    def _add_block_writes(plan: StepPlan, runs: list[ScheduledRun]) -> None:
        slots: list[int] = []
        indices: list[int] = []
        block_ids: list[int] = []
        for r in runs:
            seq = r.seq
            sent = seq.num_blocks_sent  # 0 for a sequence new at its slot
            unsent = len(seq.block_table) - sent
            if unsent:
                slots += [seq.slot] * unsent
                indices += range(sent, len(seq.block_table))
                block_ids += seq.block_table[sent:]
            seq.num_blocks_sent = len(seq.block_table)
        plan.block_slots = _array("block_slots", slots)
        plan.block_indices = _array("block_indices", indices)
        plan.block_ids = _array("block_ids", block_ids)

    @staticmethod
    def _add_runs(plan: StepPlan, runs: list[ScheduledRun]) -> None:
        flags: list[int] = []
        token_ids: list[int] = []
        for r in runs:
            seq, end = r.seq, r.start + r.num_tokens
            reaches_end = end == seq.num_tokens
            # a decode of the token the data plane sampled itself at this slot needs no id
            on_device = r.num_tokens == 1 and reaches_end and seq.last_token_on_device
            if not on_device:
                token_ids += seq.token_ids[r.start:end]
            flags.append((RUN_SAMPLE if reaches_end else 0) | (0 if on_device else RUN_TOKENS_IN_PLAN))
        plan.run_slots = _array("run_slots", [r.seq.slot for r in runs])
        plan.run_num_tokens = _array("run_num_tokens", [r.num_tokens for r in runs])
        plan.run_flags = _array("run_flags", flags)
        plan.token_ids = _array("token_ids", token_ids)
