"""Each batch slot's sampling parameters, held on the host, and one step's SamplingInputs.

`SlotSamplingParams.admit(plan)` stores the params of the plan's new sequences at
their slots; `gather(slots, positions)` builds the per-row tensors of the rows that
sample this step, and decides on the host (no device sync) which rows need more than
the plain Sampler: penalties, min_tokens bans, logprobs. BatchState owns one of these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proto.step import StepPlan


@dataclass(slots=True)
class SamplingInputs:
    """Per sampled row, on the device unless noted."""

    temperature: torch.Tensor  # f32 [num_sampled]
    top_p: torch.Tensor  # f32
    top_k: torch.Tensor  # i64
    seed: torch.Tensor  # i64
    has_seed: torch.Tensor  # bool
    positions: torch.Tensor  # i64: index in its sequence of the token being sampled
    min_p: torch.Tensor  # f32
    # rows with a penalty (host), their slots and penalties
    penalty_rows: np.ndarray
    penalty_slots: torch.Tensor  # i64
    repetition_penalty: torch.Tensor  # f32
    presence_penalty: torch.Tensor  # f32
    frequency_penalty: torch.Tensor  # f32
    # min_tokens: (row, token id) pairs to ban
    ban_rows: torch.Tensor  # i64
    ban_token_ids: torch.Tensor  # i64
    # rows that return logprobs (host), and the most top logprobs any of them asked for
    logprob_rows: np.ndarray
    num_top_logprobs: int


class SlotSamplingParams:
    def __init__(self, max_num_seqs: int, device: torch.device):
        self.device = device
        n = max_num_seqs
        self.temperature = np.ones(n, dtype=np.float32)
        self.top_p = np.ones(n, dtype=np.float32)
        self.top_k = np.full(n, -1, dtype=np.int32)
        self.seed = np.zeros(n, dtype=np.int64)
        self.has_seed = np.zeros(n, dtype=bool)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.repetition_penalty = np.ones(n, dtype=np.float32)
        self.presence_penalty = np.zeros(n, dtype=np.float32)
        self.frequency_penalty = np.zeros(n, dtype=np.float32)
        self.uses_penalties = np.zeros(n, dtype=bool)
        self.num_prompt_tokens = np.zeros(n, dtype=np.int64)
        self.min_tokens = np.zeros(n, dtype=np.int64)
        self.num_logprobs = np.full(n, -1, dtype=np.int32)
        self.num_prompt_logprobs = np.full(n, -1, dtype=np.int32)
        # banned ids until min_tokens, one row per slot, padded with -1; widened on demand
        self.stop_ids = np.full((n, 0), -1, dtype=np.int64)

    def admit(self, plan: StepPlan) -> None:
        new = plan.new_slots
        self.temperature[new] = plan.new_temperature
        self.top_p[new] = plan.new_top_p
        self.top_k[new] = plan.new_top_k
        self.seed[new] = plan.new_seed
        self.has_seed[new] = plan.new_has_seed.astype(bool)
        self.min_p[new] = plan.new_min_p
        self.repetition_penalty[new] = plan.new_repetition_penalty
        self.presence_penalty[new] = plan.new_presence_penalty
        self.frequency_penalty[new] = plan.new_frequency_penalty
        self.uses_penalties[new] = plan.new_uses_penalties
        self.num_prompt_tokens[new] = plan.new_num_prompt_tokens
        self.min_tokens[new] = plan.new_min_tokens
        self.num_logprobs[new] = plan.new_num_logprobs
        self.num_prompt_logprobs[new] = plan.new_num_prompt_logprobs
        self._admit_stop_ids(new, plan.new_num_stop_ids.astype(np.int64), plan.stop_ids)

    def _admit_stop_ids(self, new: np.ndarray, counts: np.ndarray, stop_ids: np.ndarray) -> None:
        if len(new) == 0:
            return
        width = int(counts.max())
        if width > self.stop_ids.shape[1]:
            wider = np.full((len(self.stop_ids), max(width, 2 * self.stop_ids.shape[1])), -1, dtype=np.int64)
            wider[:, :self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[new] = -1
        owner = np.repeat(np.arange(len(new)), counts)
        column = np.arange(len(stop_ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.stop_ids[new[owner], column] = stop_ids

    def gather(self, slots: np.ndarray, positions: np.ndarray, as_tensor=None) -> SamplingInputs:
        """The inputs of rows sampling at `slots`, the token being sampled at `positions`.
        as_tensor(array, dtype) may be a packed upload whose data lands later: launch no device op here."""
        device = self.device
        as_tensor = as_tensor or (lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt))
        penalty_rows = np.flatnonzero(self.uses_penalties[slots])
        penalty_slots = slots[penalty_rows]
        # min_tokens: rows that have produced fewer outputs than that ban their stop ids
        num_outputs = positions - self.num_prompt_tokens[slots]
        banning = np.flatnonzero(num_outputs < self.min_tokens[slots])
        ids = self.stop_ids[slots[banning]]
        ban_row, ban_column = np.nonzero(ids >= 0)
        logprob_rows = np.flatnonzero(self.num_logprobs[slots] >= 0)
        # one host-to-device copy per dtype, not one per parameter
        floats = as_tensor(np.stack([self.temperature[slots], self.top_p[slots], self.min_p[slots]]), torch.float32)
        ints = as_tensor(np.stack([self.top_k[slots], self.seed[slots], positions]), torch.long)
        penalties = as_tensor(np.stack([self.repetition_penalty[penalty_slots], self.presence_penalty[penalty_slots],
                                        self.frequency_penalty[penalty_slots]]), torch.float32)
        return SamplingInputs(
            temperature=floats[0], top_p=floats[1], min_p=floats[2],
            top_k=ints[0], seed=ints[1], has_seed=as_tensor(self.has_seed[slots], torch.bool), positions=ints[2],
            penalty_rows=penalty_rows,
            penalty_slots=as_tensor(penalty_slots, torch.long),
            repetition_penalty=penalties[0], presence_penalty=penalties[1], frequency_penalty=penalties[2],
            ban_rows=as_tensor(banning[ban_row], torch.long),
            ban_token_ids=as_tensor(ids[ban_row, ban_column], torch.long),
            logprob_rows=logprob_rows,
            num_top_logprobs=int(self.num_logprobs[slots[logprob_rows]].max()) if len(logprob_rows) else 0,
        )
