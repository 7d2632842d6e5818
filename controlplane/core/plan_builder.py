"""Turns one scheduling decision into a delta `proto.step.StepPlan` for the data plane.

The Scheduler decides who runs and how many tokens; this module only encodes that
decision, telling the data plane what it does not already hold: new slots with
their sampling params, block-table entries it has not seen, and token ids except
for decodes of a token it sampled itself. It records what was sent
(`Sequence.num_blocks_sent`) so the next plan sends only the difference. New
sequences with penalties also carry their prefix-cache hit's tokens, those short of
min_tokens the ids to ban, and chunks of prompts that want prompt logprobs are flagged
with the prompt tokens their rows predict.

The runs of a step are kept as columns (`StepRuns`), in batch order, so that a step of
plain decodes costs a few list appends per sequence; only the runs that carry more (a
new slot, blocks not sent yet) are kept as `ScheduledRun`s as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlplane.core.sequence import Sequence
from proto.sampling_schema import DATAPLANE_OPTIONS, column_values
from proto.step import (PLAN_ARRAYS, RUN_PROMPT_LOGPROBS, RUN_SAMPLE, RUN_SPECULATIVE, RUN_TOKENS_IN_PLAN, StepPlan,
                        empty_array)


@dataclass(slots=True)
class ScheduledRun:
    seq: Sequence
    start: int  # seq.num_computed_tokens before this step's chunk: the KV the data plane already holds
    num_tokens: int
    is_new: bool  # the sequence got its slot this step


class StepRuns:
    """One step's runs in batch order, as the columns of the plan's run_* and token_ids."""

    __slots__ = ("slots", "starts", "num_tokens", "flags", "token_ids", "prompt_logprob_counts",
                 "prompt_logprob_token_ids", "spec_num_drafts", "others")

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.starts: list[int] = []  # each run's first position: the KV the data plane already holds
        self.num_tokens: list[int] = []
        self.flags: list[int] = []
        self.token_ids: list[int] = []  # of the runs flagged RUN_TOKENS_IN_PLAN, in run order
        self.prompt_logprob_counts: list[int] = []
        self.prompt_logprob_token_ids: list[int] = []
        self.spec_num_drafts: list[int] = []  # of the speculative runs, in run order
        self.others: list[ScheduledRun] = []  # the runs of new sequences and of those with blocks to send

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, seq: Sequence, start: int, n: int, is_new: bool, samples: bool, on_device: bool) -> None:
        """Appends seq's run of n tokens from start (Scheduler._take says which kind it is)."""
        if on_device:  # a decode of the token the data plane sampled last at this slot
            flags = RUN_SAMPLE
        else:
            assert start + n <= len(seq.token_ids), f"{seq.seq_id}: a chunk with a pending token must be its decode"
            self.token_ids += seq.token_ids[start:start + n]
            flags = RUN_SAMPLE | RUN_TOKENS_IN_PLAN if samples else RUN_TOKENS_IN_PLAN
        if seq.needs_prompt_logprobs:
            num_targets = num_prompt_targets(seq, start, n)
            if num_targets:
                self.prompt_logprob_counts.append(num_targets)
                self.prompt_logprob_token_ids += seq.token_ids[start + 1:start + 1 + num_targets]
                flags |= RUN_PROMPT_LOGPROBS
        self.slots.append(seq.slot)
        self.starts.append(start)
        self.num_tokens.append(n)
        self.flags.append(flags)
        if is_new or seq.num_blocks_sent != len(seq.block_table):
            self.others.append(ScheduledRun(seq, start, n, is_new))


    def add_speculative(self, seq: Sequence, start: int, drafts: list[int]) -> None:
        """Appends seq's run of its last token (start is its position) and drafts, sampling every position."""
        self.token_ids += seq.token_ids[start:]
        self.token_ids += drafts
        self.slots.append(seq.slot)
        self.starts.append(start)
        self.num_tokens.append(1 + len(drafts))
        self.flags.append(RUN_SAMPLE | RUN_TOKENS_IN_PLAN | RUN_SPECULATIVE)
        self.spec_num_drafts.append(len(drafts))
        if seq.num_blocks_sent != len(seq.block_table):
            self.others.append(ScheduledRun(seq, start, 1 + len(drafts), False))


def _array(name: str, values: list) -> np.ndarray:
    if not values:
        return empty_array(PLAN_ARRAYS[name])
    return np.fromiter(values, dtype=PLAN_ARRAYS[name], count=len(values))  # a third faster than np.asarray


def banned_until_min_tokens(seq: Sequence, eos_token_ids: tuple[int, ...]) -> list[int]:
    """The ids the data plane must not sample while seq has fewer than min_tokens outputs."""
    sampling = seq.sampling
    if sampling.min_tokens <= 0:
        return []
    return sorted(set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(eos_token_ids)))


def num_prompt_targets(seq: Sequence, start: int, num_tokens: int) -> int:
    """How many prompt tokens the rows of the chunk [start, start + num_tokens) predict: row i
    predicts token start + i + 1, and only tokens 1 .. num_prompt_tokens - 1 are prompt."""
    return max(0, min(start + num_tokens, seq.num_prompt_tokens - 1) - start)


class PlanBuilder:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.next_step_id = 0
        self.eos_token_ids = tuple(eos_token_ids)

    def build(self, drop_slots: list[int], runs: StepRuns, rewinds: list[tuple[int, int]] = ()) -> StepPlan:
        new = [r for r in runs.others if r.is_new]
        plan = StepPlan(
            step_id=self.next_step_id,
            drop_slots=_array("drop_slots", drop_slots),
            run_slots=_array("run_slots", runs.slots),
            run_num_tokens=_array("run_num_tokens", runs.num_tokens),
            run_flags=_array("run_flags", runs.flags),
            token_ids=_array("token_ids", runs.token_ids),
            prompt_logprob_counts=_array("prompt_logprob_counts", runs.prompt_logprob_counts),
            prompt_logprob_token_ids=_array("prompt_logprob_token_ids", runs.prompt_logprob_token_ids),
        )
        if runs.spec_num_drafts:
            plan.spec_num_drafts = _array("spec_num_drafts", runs.spec_num_drafts)
        if rewinds:
            plan.rewind_slots = _array("rewind_slots", [slot for slot, _ in rewinds])
            plan.rewind_num_tokens = _array("rewind_num_tokens", [n for _, n in rewinds])
        if new:
            self._add_new(plan, new)
        self._add_block_writes(plan, runs.others)
        self.next_step_id += 1
        return plan

    def _add_new(self, plan: StepPlan, new: list[ScheduledRun]) -> None:
        options = [r.seq.sampling for r in new]
        plan.new_slots = _array("new_slots", [r.seq.slot for r in new])
        plan.new_num_cached_tokens = _array("new_num_cached_tokens", [r.start for r in new])
        plan.new_num_prompt_tokens = _array("new_num_prompt_tokens", [r.seq.num_prompt_tokens for r in new])
        for option in DATAPLANE_OPTIONS:
            values = [getattr(o, option.name) for o in options]
            if option.name == "prompt_logprobs":  # none left to return: a preempted sequence past its prompt
                values = [v if r.seq.needs_prompt_logprobs else None for v, r in zip(values, new)]
            for column in option.columns:
                setattr(plan, column.field, _array(column.field, column_values(values, column)))
        banned = [banned_until_min_tokens(r.seq, self.eos_token_ids) for r in new]
        plan.new_num_stop_ids = _array("new_num_stop_ids", [len(b) for b in banned])
        plan.stop_ids = _array("stop_ids", [t for b in banned for t in b])
        plan.cached_token_ids = _array("cached_token_ids", [
            t for r in new if r.seq.sampling.uses_penalties for t in r.seq.token_ids[:r.start]])

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
