"""The data plane's persistent batch: what it remembers about each slot between steps.

A StepPlan carries only deltas; `BatchState.apply(plan)` folds them in and returns
the `StepInputs` of this step (input ids, positions, slot mapping, attention
metadata, sampling params of the rows that sample). Host-side bookkeeping is numpy;
the last sampled token of each slot stays on the device, so decode inputs never
cross the wire or the PCIe bus. Sampling params live in `SlotSamplingParams`
(dataplane/sampling_params.py); the token history that penalties need, in
`PenaltyState` (dataplane/layers/penalties.py), fed here with every token that runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dataplane.context import AttentionMetadata
from dataplane.layers.penalties import PenaltyState
from dataplane.sampling_params import SamplingInputs, SlotSamplingParams
from proto.step import RUN_PROMPT_LOGPROBS, RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan


class PlanError(ValueError):
    """The plan contradicts the data plane's state or limits (a control-plane bug or a stale stream)."""


@dataclass(slots=True)
class PromptLogprobInputs:
    rows: torch.Tensor  # i64: rows of the hidden states whose logits predict a prompt token
    token_ids: torch.Tensor  # i64: the prompt token each row predicts
    num_top: int  # the most top logprobs any of them asked for


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # i64 [num_tokens]
    positions: torch.Tensor  # i64 [num_tokens]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # i64 [num_sampled]: rows of the hidden states to sample from
    sampled_slots: np.ndarray  # i32 [num_sampled]
    sampling: SamplingInputs
    prompt_logprobs: PromptLogprobInputs | None = None


class BatchState:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, num_blocks: int,
                 max_model_len: int, vocab_size: int, device: torch.device):
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.device = device
        self.block_tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_computed = np.zeros(max_num_seqs, dtype=np.int64)
        self.active = np.zeros(max_num_seqs, dtype=bool)
        self.has_last_token = np.zeros(max_num_seqs, dtype=bool)
        self.sampling_params = SlotSamplingParams(max_num_seqs, device)
        self.penalties = PenaltyState(max_num_seqs, vocab_size, device)
        self.last_token = torch.zeros(max_num_seqs, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.active[:] = False
        self.has_last_token[:] = False
        self.num_computed[:] = 0

    def _check_slots(self, slots: np.ndarray, what: str) -> None:
        if len(slots) and (slots.min() < 0 or slots.max() >= self.max_num_seqs):
            raise PlanError(f"{what}: slot out of range [0, {self.max_num_seqs})")

    def _check_token_ids(self, token_ids: np.ndarray, what: str) -> None:
        if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= self.vocab_size):
            raise PlanError(f"{what}: token id outside the vocabulary [0, {self.vocab_size})")

    def _admit_penalty_history(self, plan: StepPlan) -> None:
        """New sequences with penalties start from empty rows plus their prefix-cache hit,
        whose tokens never run here (the plan carries them as cached_token_ids)."""
        uses = plan.new_uses_penalties
        if not np.any(uses):
            return
        slots = plan.new_slots[uses]
        self.penalties.reset(slots)
        num_cached = plan.new_num_cached_tokens[uses].astype(np.int64)
        if num_cached.sum():
            owner = np.repeat(np.arange(len(slots)), num_cached)
            positions = np.arange(int(num_cached.sum())) - np.repeat(np.cumsum(num_cached) - num_cached, num_cached)
            is_prompt = positions < plan.new_num_prompt_tokens[uses][owner]
            token_ids = torch.from_numpy(plan.cached_token_ids.astype(np.int64)).to(self.device)
            self.penalties.observe(token_ids, slots[owner], is_prompt)

    def apply(self, plan: StepPlan) -> StepInputs | None:
        """Folds the plan's deltas into the state and builds this step's inputs (None when nothing runs)."""
        self._check_slots(plan.drop_slots, "drop_slots")
        self.active[plan.drop_slots] = False
        self.has_last_token[plan.drop_slots] = False

        new = plan.new_slots
        self._check_slots(new, "new_slots")
        if np.any(self.active[new]):
            raise PlanError("new_slots: a slot is still in use; drop it first")
        if len(np.unique(new)) != len(new):
            raise PlanError("new_slots: a slot appears twice")
        self.active[new] = True
        self.has_last_token[new] = False
        self.num_computed[new] = plan.new_num_cached_tokens
        for name in ("stop_ids", "cached_token_ids", "prompt_logprob_token_ids"):
            self._check_token_ids(getattr(plan, name), name)
        for name in ("new_num_logprobs", "new_num_prompt_logprobs"):
            if len(new) and getattr(plan, name).max() > self.vocab_size:
                raise PlanError(f"{name}: more top logprobs than the vocabulary has ({self.vocab_size})")
        self.sampling_params.admit(plan)
        self._admit_penalty_history(plan)

        self._check_slots(plan.block_slots, "block_slots")
        if len(plan.block_ids):
            if plan.block_ids.min() < 0 or plan.block_ids.max() >= self.num_blocks:
                raise PlanError(f"block_ids: block id out of range [0, {self.num_blocks})")
            if plan.block_indices.min() < 0 or plan.block_indices.max() >= self.max_blocks_per_seq:
                raise PlanError(f"block_indices: index out of range [0, {self.max_blocks_per_seq})")
            self.block_tables[plan.block_slots, plan.block_indices] = plan.block_ids

        if len(plan.run_slots) == 0:
            return None
        return self._build_inputs(plan)

    def _build_inputs(self, plan: StepPlan) -> StepInputs:
        slots = plan.run_slots
        self._check_slots(slots, "run_slots")
        if not np.all(self.active[slots]):
            raise PlanError("run_slots: a slot that is not in the batch was scheduled")
        if len(np.unique(slots)) != len(slots):
            raise PlanError("run_slots: a slot is scheduled twice")
        counts = plan.run_num_tokens.astype(np.int64)
        in_plan = (plan.run_flags & RUN_TOKENS_IN_PLAN) != 0
        sample = (plan.run_flags & RUN_SAMPLE) != 0
        if np.any(~in_plan & ~self.has_last_token[slots]):
            raise PlanError("run_flags: a decode without token ids for a slot that has not sampled yet")

        start = self.num_computed[slots]
        seq_lens = start + counts
        if seq_lens.max() > self.max_model_len:
            raise PlanError(f"a sequence would exceed max_model_len {self.max_model_len}")
        num_blocks_needed = (seq_lens + self.block_size - 1) // self.block_size
        if num_blocks_needed.max() > self.max_blocks_per_seq:
            raise PlanError("a sequence needs more blocks than a block table holds")

        cu_seqlens = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(counts, out=cu_seqlens[1:])
        num_tokens = int(cu_seqlens[-1])
        # position of every token: its sequence's start + its offset within the entry
        entry_of_token = np.repeat(np.arange(len(slots)), counts)
        positions = start[entry_of_token] + (np.arange(num_tokens) - cu_seqlens[entry_of_token])
        token_slots = slots[entry_of_token]
        block_ids = self.block_tables[token_slots, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size

        device = self.device
        input_ids = torch.empty(num_tokens, dtype=torch.long, device=device)
        token_in_plan = in_plan[entry_of_token]
        if len(plan.token_ids):
            plan_rows = torch.from_numpy(np.nonzero(token_in_plan)[0]).to(device)
            tokens = torch.from_numpy(plan.token_ids.astype(np.int64)).to(device)
            if tokens.numel() and (int(plan.token_ids.min()) < 0 or int(plan.token_ids.max()) >= self.vocab_size):
                raise PlanError(f"token_ids: token id outside the vocabulary [0, {self.vocab_size})")
            input_ids[plan_rows] = tokens
        if not np.all(in_plan):
            device_rows = torch.from_numpy(np.nonzero(~token_in_plan)[0]).to(device)
            device_slots = torch.from_numpy(slots[~in_plan].astype(np.int64)).to(device)
            input_ids[device_rows] = self.last_token[device_slots]
        penalised = self.sampling_params.uses_penalties[token_slots]
        if np.any(penalised):
            rows = np.flatnonzero(penalised)
            is_prompt = positions[rows] < self.sampling_params.num_prompt_tokens[token_slots[rows]]
            self.penalties.observe(input_ids[torch.from_numpy(rows).to(device)], token_slots[rows], is_prompt)

        max_blocks = int(num_blocks_needed.max())
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slot_mapping).to(device),
            query_start_loc=torch.from_numpy(cu_seqlens.astype(np.int32)).to(device),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
            block_tables=torch.from_numpy(np.ascontiguousarray(self.block_tables[slots, :max_blocks])).to(device),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=cu_seqlens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        self.num_computed[slots] = seq_lens

        sampled_slots = slots[sample]
        sample_rows = cu_seqlens[1:][sample] - 1
        return StepInputs(
            input_ids=input_ids,
            positions=torch.from_numpy(positions).to(device),
            meta=meta,
            sample_indices=torch.from_numpy(sample_rows).to(device),
            sampled_slots=sampled_slots.astype(np.int32),
            sampling=self.sampling_params.gather(sampled_slots, seq_lens[sample]),
            prompt_logprobs=self._prompt_logprob_inputs(plan, cu_seqlens),
        )

    def _prompt_logprob_inputs(self, plan: StepPlan, cu_seqlens: np.ndarray) -> PromptLogprobInputs | None:
        """Entry e flagged RUN_PROMPT_LOGPROBS with count c: its first c rows predict the next c prompt tokens."""
        flagged = np.flatnonzero(plan.run_flags & RUN_PROMPT_LOGPROBS)
        if not len(flagged):
            return None
        counts = plan.prompt_logprob_counts.astype(np.int64)
        first_row = np.repeat(cu_seqlens[flagged], counts)
        rows = first_row + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        num_top = int(self.sampling_params.num_prompt_logprobs[plan.run_slots[flagged]].max())
        return PromptLogprobInputs(rows=torch.from_numpy(rows).to(self.device),
                                   token_ids=torch.from_numpy(plan.prompt_logprob_token_ids.astype(np.int64)).to(self.device),
                                   num_top=max(num_top, 0))

    def record_sampled(self, slots: np.ndarray, token_ids: torch.Tensor) -> None:
        if len(slots):
            self.last_token[torch.from_numpy(slots.astype(np.int64)).to(self.device)] = token_ids
            self.has_last_token[slots] = True
