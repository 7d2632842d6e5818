"""What the data plane remembers for sampling, per slot, and what it hands the sampling step each step.

`SamplingState` owns each slot's sampling params (`SlotSamplingParams`) and the token history
penalties need (`PenaltyState`). BatchState (dataplane/batch_state.py), which prepares a step's
inputs, calls it at fixed points of its one upload: while staging (`admit`, `stage_history`,
`stage_token_rows`, `gather`), then after the upload landed (`apply_history`, `observe`). Nothing
here reads the device, so preparing a step never waits for steps still in flight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dataplane.sampling.penalties import PenaltyState
from dataplane.sampling.sampler import SamplerPlan, SamplingDecision, decide_sampling
from dataplane.sampling.sampling_params import SAMPLER_COLUMNS, SamplingInputs, SlotSamplingParams, SlotSelection
from proto.step import StepPlan

Stage = Callable[[np.ndarray, torch.dtype], torch.Tensor]  # a host array into the step's upload


@dataclass(slots=True)
class PenaltyHistory:
    """New sequences with penalties: their slots start from empty rows plus their prefix-cache hit."""

    slots: np.ndarray
    token_ids: torch.Tensor  # i64, staged: the hits' tokens, concatenated
    token_slots: np.ndarray  # the slot of each
    is_prompt: np.ndarray  # bool: each is a prompt token (not an output of a preempted sequence)


@dataclass(slots=True)
class PenaltyTokens:
    """The step's input tokens whose slots use penalties: counted once the input ids are on the device."""

    rows: torch.Tensor  # i64, staged: rows of the step's input ids
    slots: np.ndarray
    is_prompt: np.ndarray


class SamplingState:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.params = SlotSamplingParams(max_num_seqs, device)
        self.penalties = PenaltyState(max_num_seqs, vocab_size, device)
        self._decided: tuple[SlotSelection, SamplingDecision] | None = None  # gather's last, for its selection

    def admit(self, plan: StepPlan) -> None:
        """The plan's new sequences' params, at their slots (host only)."""
        self.params.admit(plan)

    def stage_history(self, plan: StepPlan, stage: Stage) -> PenaltyHistory | None:
        """New sequences with penalties start from empty rows plus their prefix-cache hit,
        whose tokens never run here (the plan carries them as cached_token_ids)."""
        if not len(plan.new_slots):
            return None
        uses = plan.new_uses_penalties
        if not np.any(uses):
            return None
        slots = plan.new_slots[uses]
        num_cached = plan.new_num_cached_tokens[uses].astype(np.int64)
        owner = np.repeat(np.arange(len(slots)), num_cached)
        positions = np.arange(int(num_cached.sum())) - np.repeat(np.cumsum(num_cached) - num_cached, num_cached)
        is_prompt = positions < plan.new_num_prompt_tokens[uses][owner]
        return PenaltyHistory(slots, stage(plan.cached_token_ids, torch.long), slots[owner], is_prompt)

    def apply_history(self, history: PenaltyHistory) -> None:
        self.penalties.reset(history.slots)
        if len(history.token_slots):
            self.penalties.observe(history.token_ids, history.token_slots, history.is_prompt)

    def stage_token_rows(self, token_slots: np.ndarray, positions: np.ndarray, stage: Stage) -> PenaltyTokens | None:
        """Of the step's tokens (their slots and positions), those that penalties count."""
        rows = np.flatnonzero(self.params.uses_penalties[token_slots])
        if not len(rows):
            return None
        slots = token_slots[rows]
        return PenaltyTokens(stage(rows, torch.long), slots, positions[rows] < self.params.num_prompt_tokens[slots])

    def observe(self, input_ids: torch.Tensor, tokens: PenaltyTokens) -> None:
        self.penalties.observe(input_ids[tokens.rows], tokens.slots, tokens.is_prompt)

    def gather(self, slots: np.ndarray, positions: np.ndarray, stage: Stage) -> tuple[SamplingInputs, SamplerPlan]:
        """The inputs of the rows sampling at `slots` (the tokens sampled at `positions`), and the Sampler's
        plan for them, decided on the host."""
        params = self.params
        selection = params.selection(slots)
        if self._decided is None or self._decided[0] is not selection:
            # the plan needs whether a row is seeded, not its seed
            self._decided = selection, decide_sampling(
                **{name: getattr(params, name)[selection.slots] for name in SAMPLER_COLUMNS if name != "seed"},
                vocab_size=self.vocab_size)
        return selection.gather(positions, stage), self._decided[1].plan(lambda rows: stage(rows, torch.long))

    def num_top_prompt_logprobs(self, slots: np.ndarray) -> int:
        """The most prompt logprobs any of the sequences at `slots` asked for."""
        return max(int(self.params.num_prompt_logprobs[slots].max()), 0)
