"""The data plane's persistent batch: what it remembers about each slot between steps.

A StepPlan carries only deltas; `BatchState.apply(plan)` folds them in and returns
the `StepInputs` of this step (input ids, positions, slot mapping, attention
metadata, sampling params of the rows that sample). Host-side bookkeeping is numpy;
the block tables are mirrored on the device (a plan's block writes are scattered into
them), and the last sampled token of each slot stays there, so a decode step's input
ids never cross the wire or the PCIe bus. The small arrays a step does send go in one
packed, pinned upload (dataplane/host_transfer.py), and nothing here reads the device:
`apply` never waits for steps still in flight. This module is where a step's inputs are
prepared; what sampling remembers per slot (params, the token history penalties need) lives in
`SamplingState` (dataplane/sampling/sampling_state.py), which `apply` feeds with every plan and
every token that runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dataplane.context import AttentionMetadata
from dataplane.host_transfer import Uploads
from dataplane.sampling.sampler import SamplerPlan
from dataplane.sampling.sampling_params import SamplingInputs
from dataplane.sampling.sampling_state import PenaltyTokens, SamplingState
from dataplane.step_layout import StepLayouts
from proto.step import RUN_PROMPT_LOGPROBS, RUN_TOKENS_IN_PLAN, StepPlan


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
    # device copies of host index sets: sampled_slots, sampling.logprob_rows, sampling.penalty_rows
    sampled_index: torch.Tensor | None = None
    logprob_index: torch.Tensor | None = None
    penalty_index: torch.Tensor | None = None
    sampler_plan: SamplerPlan | None = None
    # structured output: sampled-row indices (int64) and their bitmasks (int32 [n, words]), or None
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None
    samples_every_row: bool = False  # sample_indices is 0, 1, ..., num_tokens - 1 (a decode step)

    def sampled_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of hidden to sample from; all of them without a gather when every row samples."""
        return hidden if self.samples_every_row else hidden[self.sample_indices]


@dataclass(slots=True)
class StagedStep:
    """A step's inputs whose arrays are staged in the upload, and what its device side needs once that landed."""

    inputs: StepInputs  # input_ids and meta.block_tables are filled in by _finish_inputs
    max_blocks: int  # block-table columns the step reads
    plan_ids: torch.Tensor | None  # i64 [num_tokens]: the plan's token ids, 0 at decodes; None when it has none
    decode_rows: torch.Tensor | None  # i64: rows of decodes, which read their slot's last sampled token
    decode_slots: torch.Tensor | None  # i64: those slots
    penalty_tokens: PenaltyTokens | None


def _has_repeats(slots: np.ndarray) -> bool:
    """Whether a slot appears twice; the slots are in range (cheaper than np.unique)."""
    return len(slots) > 1 and np.bincount(slots).max() > 1


class BatchState:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, num_blocks: int,
                 max_model_len: int, vocab_size: int, device: torch.device, max_num_batched_tokens: int = 0):
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
        self.sampling = SamplingState(max_num_seqs, vocab_size, device)
        self.layouts = StepLayouts()
        self.last_token = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.block_tables_device = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        # a full step's ids, positions and slot mapping, plus a few int64 per slot; a bigger step grows it
        self.uploads = Uploads(device, 24 * max(max_num_batched_tokens, max_num_seqs) + 128 * max_num_seqs + 4096)

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

    def apply(self, plan: StepPlan) -> StepInputs | None:
        """Folds the plan's deltas into the state and builds this step's inputs (None when nothing runs).
        Everything is checked on the host before any device work, so a rejected plan leaves the device as it was."""
        if len(plan.rewind_slots):
            self._rewind(plan)
        self._check_slots(plan.drop_slots, "drop_slots")
        self.active[plan.drop_slots] = False
        self.has_last_token[plan.drop_slots] = False

        for name in ("stop_ids", "cached_token_ids", "prompt_logprob_token_ids", "token_ids"):
            self._check_token_ids(getattr(plan, name), name)
        if len(plan.new_slots):
            self._admit(plan)

        self._check_slots(plan.block_slots, "block_slots")
        if len(plan.block_ids):
            if plan.block_ids.min() < 0 or plan.block_ids.max() >= self.num_blocks:
                raise PlanError(f"block_ids: block id out of range [0, {self.num_blocks})")
            if plan.block_indices.min() < 0 or plan.block_indices.max() >= self.max_blocks_per_seq:
                raise PlanError(f"block_indices: index out of range [0, {self.max_blocks_per_seq})")
            self.block_tables[plan.block_slots, plan.block_indices] = plan.block_ids
        if len(plan.run_slots):
            self._check_runs(plan)

        # host work done: stage what the device needs, send it in one copy, then enqueue the device work
        uploads = self.uploads
        uploads.begin()
        writes = None
        if len(plan.block_ids):
            writes = (uploads.stage(plan.block_slots, torch.long), uploads.stage(plan.block_indices, torch.long),
                      uploads.stage(plan.block_ids, torch.int32))
        history = self.sampling.stage_history(plan, uploads.stage)
        staged = self._stage_inputs(plan) if len(plan.run_slots) else None
        uploads.flush()
        if writes is not None:
            self.block_tables_device[writes[0], writes[1]] = writes[2]
        if history is not None:
            self.sampling.apply_history(history)
        return None if staged is None else self._finish_inputs(staged)

    def _admit(self, plan: StepPlan) -> None:
        new = plan.new_slots
        self._check_slots(new, "new_slots")
        if np.any(self.active[new]):
            raise PlanError("new_slots: a slot is still in use; drop it first")
        if _has_repeats(new):
            raise PlanError("new_slots: a slot appears twice")
        for name in ("new_num_logprobs", "new_num_prompt_logprobs"):
            if getattr(plan, name).max() > self.vocab_size:
                raise PlanError(f"{name}: more top logprobs than the vocabulary has ({self.vocab_size})")
        self.active[new] = True
        self.has_last_token[new] = False
        self.num_computed[new] = plan.new_num_cached_tokens
        self.sampling.admit(plan)

    def _rewind(self, plan: StepPlan) -> None:
        """Speculative decoding: the KV of drafts the control plane rejected is no longer this slot's."""
        slots, counts = plan.rewind_slots, plan.rewind_num_tokens.astype(np.int64)
        self._check_slots(slots, "rewind_slots")
        if not np.all(self.active[slots]) or _has_repeats(slots):
            raise PlanError("rewind_slots: each must be a distinct slot in the batch")
        if np.any(counts > self.num_computed[slots]):
            raise PlanError("rewind_num_tokens: more than the slot has computed")
        self.num_computed[slots] -= counts

    def _check_runs(self, plan: StepPlan) -> None:
        slots = plan.run_slots
        self._check_slots(slots, "run_slots")
        if not np.all(self.active[slots]):
            raise PlanError("run_slots: a slot that is not in the batch was scheduled")
        if _has_repeats(slots):
            raise PlanError("run_slots: a slot is scheduled twice")
        in_plan = (plan.run_flags & RUN_TOKENS_IN_PLAN) != 0
        if np.any(~in_plan & ~self.has_last_token[slots]):
            raise PlanError("run_flags: a decode without token ids for a slot that has not sampled yet")
        seq_lens = self.num_computed[slots] + plan.run_num_tokens
        if seq_lens.max() > self.max_model_len:
            raise PlanError(f"a sequence would exceed max_model_len {self.max_model_len}")
        if (seq_lens.max() + self.block_size - 1) // self.block_size > self.max_blocks_per_seq:
            raise PlanError("a sequence needs more blocks than a block table holds")

    def _stage_inputs(self, plan: StepPlan) -> StagedStep:
        stage = self.uploads.stage
        layout = self.layouts.of(plan)
        slots, token_slots = layout.slots, layout.token_slots
        start = self.num_computed[slots]
        seq_lens = start + layout.counts
        max_blocks = int((seq_lens.max() + self.block_size - 1) // self.block_size)
        positions = start[layout.entry_of_token] + layout.offset_of_token
        block_ids = self.block_tables[token_slots, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        self.num_computed[slots] = seq_lens

        # input ids: the plan's tokens where it has them; decodes read the slot's last sampled token on the device
        ids = None
        if len(plan.token_ids):
            host_ids = np.zeros(layout.num_tokens, dtype=np.int64)
            host_ids[layout.token_in_plan] = plan.token_ids
            ids = stage(host_ids, torch.long)
        decode_rows = decode_slots = None
        if layout.decode_rows is not None:
            decode_rows, decode_slots = stage(layout.decode_rows, torch.long), stage(layout.decode_slots, torch.long)
        penalty_tokens = self.sampling.stage_token_rows(token_slots, positions, stage)

        sampled_slots = layout.sampled_slots
        sampling, sampler_plan = self.sampling.gather(sampled_slots, seq_lens[layout.row_entry] - layout.row_back,
                                                      stage)
        grammar_rows = plan.grammar_rows
        if len(grammar_rows) and layout.any_speculative:  # they index sampling entries; the logits have a row per sample
            grammar_rows = (np.cumsum(layout.rows_per_entry) - 1)[grammar_rows]
        query_start, attn_seq_lens, attn_slots = layout.cu_seqlens, seq_lens, slots
        if layout.one_query_per_token:
            query_start = np.arange(layout.num_tokens + 1, dtype=np.int64)
            attn_seq_lens, attn_slots = positions + 1, token_slots
        inputs = StepInputs(
            input_ids=None,  # _finish_inputs: from ids and the slots' last sampled tokens
            positions=stage(positions, torch.long),
            meta=AttentionMetadata(
                slot_mapping=stage(slot_mapping, torch.long),
                query_start_loc=stage(query_start, torch.int32),
                seq_lens=stage(attn_seq_lens, torch.int32),
                block_tables=stage(attn_slots, torch.long),  # the rows to gather, replaced in _finish_inputs
                max_query_len=layout.max_query_len,
                max_seq_len=int(seq_lens.max()),
                query_start_loc_cpu=query_start.tolist(),
                seq_lens_cpu=attn_seq_lens.tolist(),
            ),
            sample_indices=stage(layout.sample_rows, torch.long),
            samples_every_row=layout.samples_every_row,
            sampled_slots=sampled_slots.astype(np.int32),
            sampling=sampling,
            prompt_logprobs=self._prompt_logprob_inputs(plan, layout.cu_seqlens),
            sampled_index=stage(sampled_slots, torch.long),
            logprob_index=stage(sampling.logprob_rows, torch.long),
            penalty_index=stage(sampling.penalty_rows, torch.long),
            sampler_plan=sampler_plan,
            grammar=(stage(grammar_rows, torch.long),
                     stage(plan.grammar_bitmask.reshape(len(plan.grammar_rows), -1), torch.int32))
            if len(plan.grammar_rows) else None,
        )
        return StagedStep(inputs, max_blocks, ids, decode_rows, decode_slots, penalty_tokens)

    def _finish_inputs(self, staged: StagedStep) -> StepInputs:
        """The device side of the step's inputs, enqueued after the upload."""
        inputs = staged.inputs
        row_slots = inputs.meta.block_tables
        inputs.meta.block_tables = self.block_tables_device[:, :staged.max_blocks].index_select(0, row_slots)
        ids = staged.plan_ids
        if staged.decode_rows is None:
            inputs.input_ids = ids
        elif ids is None:
            inputs.input_ids = self.last_token.index_select(0, staged.decode_slots)
        else:
            ids[staged.decode_rows] = self.last_token.index_select(0, staged.decode_slots)
            inputs.input_ids = ids
        if staged.penalty_tokens is not None:
            self.sampling.observe(inputs.input_ids, staged.penalty_tokens)
        return inputs

    def _prompt_logprob_inputs(self, plan: StepPlan, cu_seqlens: np.ndarray) -> PromptLogprobInputs | None:
        """Entry e flagged RUN_PROMPT_LOGPROBS with count c: its first c rows predict the next c prompt tokens."""
        flagged = np.flatnonzero(plan.run_flags & RUN_PROMPT_LOGPROBS)
        if not len(flagged):
            return None
        counts = plan.prompt_logprob_counts.astype(np.int64)
        first_row = np.repeat(cu_seqlens[flagged], counts)
        rows = first_row + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return PromptLogprobInputs(rows=self.uploads.stage(rows, torch.long),
                                   token_ids=self.uploads.stage(plan.prompt_logprob_token_ids, torch.long),
                                   num_top=self.sampling.num_top_prompt_logprobs(plan.run_slots[flagged]))

    def record_sampled(self, slots: np.ndarray, token_ids: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """token_ids (on the device) were sampled at slots; index: slots as an int64 device tensor, when at hand."""
        if len(slots):
            if index is None:
                index = torch.from_numpy(slots.astype(np.int64)).to(self.device)
            self.last_token[index] = token_ids
            self.has_last_token[slots] = True
