"""Turns one scheduling decision into a delta `proto.step.StepPlan` for the data plane.

The Scheduler decides who runs and how many tokens; this module only encodes that
decision, telling the data plane what it does not already hold: new slots with
their sampling params, block-table entries it has not seen, and token ids except
for decodes of a token it sampled itself. It records what was sent
(`Sequence.num_blocks_sent`) so the next plan sends only the difference. New
sequences with penalties also carry their prefix-cache hit's tokens, those short of
min_tokens the ids to ban, and chunks of prompts that want prompt logprobs are flagged
with the prompt tokens their rows predict.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlplane.sequence import Sequence
from proto.step import PLAN_ARRAYS, RUN_PROMPT_LOGPROBS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan


@dataclass(slots=True)
class ScheduledRun:
    seq: Sequence
    start: int  # seq.num_computed_tokens before this step's chunk: the KV the data plane already holds
    num_tokens: int
    is_new: bool  # the sequence got its slot this step
    samples: bool = False  # the chunk reaches the sequence's end: a token is sampled after it
    token_on_device: bool = False  # a decode of the token the data plane sampled last at this slot


def _array(name: str, values) -> np.ndarray:
    return np.asarray(values, dtype=PLAN_ARRAYS[name])


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
        self._add_new_sampling(plan, new)
        self._add_block_writes(plan, runs)
        self._add_runs(plan, runs)
        self.next_step_id += 1
        return plan

    def _add_new_sampling(self, plan: StepPlan, new: list[ScheduledRun]) -> None:
        options = [r.seq.sampling for r in new]
        plan.new_num_prompt_tokens = _array("new_num_prompt_tokens", [r.seq.num_prompt_tokens for r in new])
        for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens"):
            setattr(plan, f"new_{name}", _array(f"new_{name}", [getattr(o, name) for o in options]))
        plan.new_num_logprobs = _array("new_num_logprobs", [-1 if o.logprobs is None else o.logprobs for o in options])
        plan.new_num_prompt_logprobs = _array("new_num_prompt_logprobs", [
            r.seq.sampling.prompt_logprobs if r.seq.needs_prompt_logprobs else -1 for r in new])
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

    @staticmethod
    def _add_runs(plan: StepPlan, runs: list[ScheduledRun]) -> None:
        flags: list[int] = []
        token_ids: list[int] = []
        prompt_logprob_counts: list[int] = []
        prompt_logprob_token_ids: list[int] = []
        for r in runs:
            seq, end, on_device = r.seq, r.start + r.num_tokens, r.token_on_device
            if not on_device:
                assert end <= seq.num_tokens, f"{seq.seq_id}: a chunk with a pending token must be its decode"
                token_ids += seq.token_ids[r.start:end]
            num_targets = num_prompt_targets(seq, r.start, r.num_tokens) if seq.needs_prompt_logprobs else 0
            if num_targets:
                prompt_logprob_counts.append(num_targets)
                prompt_logprob_token_ids += seq.token_ids[r.start + 1:r.start + 1 + num_targets]
            flags.append((RUN_SAMPLE if r.samples else 0) | (0 if on_device else RUN_TOKENS_IN_PLAN)
                         | (RUN_PROMPT_LOGPROBS if num_targets else 0))
        plan.run_slots = _array("run_slots", [r.seq.slot for r in runs])
        plan.run_num_tokens = _array("run_num_tokens", [r.num_tokens for r in runs])
        plan.run_flags = _array("run_flags", flags)
        plan.token_ids = _array("token_ids", token_ids)
        plan.prompt_logprob_counts = _array("prompt_logprob_counts", prompt_logprob_counts)
        plan.prompt_logprob_token_ids = _array("prompt_logprob_token_ids", prompt_logprob_token_ids)
