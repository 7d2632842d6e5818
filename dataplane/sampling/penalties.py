"""Logit processors that depend on a sequence's history: penalties and min_tokens.

`PenaltyState` keeps, per batch slot and on the device, which tokens occur in the
sequence's prompt (bool) and how often each occurs in its output (int32). It is
allocated on first use (a batch that never asks for a penalty pays nothing) and
updated incrementally: BatchState feeds it every token that runs (prefill chunks,
decodes of the token sampled the step before) and the prefix-cache hits of new
sequences, each marked prompt or output by its position. A preempted sequence comes
back with prompt and outputs, and its slot's row is rebuilt from them.

`apply_penalties` follows HF transformers' RepetitionPenaltyLogitsProcessor (over
prompt and output) and OpenAI's presence/frequency formula (over the output), in
vLLM's order: repetition, then frequency and presence. `ban_tokens` is min_tokens.
dataplane/sampling/sampling_step.py calls both before the Sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class PenaltyState:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device):
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.device = device
        # [max_num_seqs, vocab]: 39M entries for 256 slots of a 152k vocabulary (195 MB together)
        self.prompt_mask: torch.Tensor | None = None  # bool
        self.output_counts: torch.Tensor | None = None  # int32

    @property
    def allocated(self) -> bool:
        return self.output_counts is not None

    def _allocate(self) -> None:
        shape = (self.max_num_seqs, self.vocab_size)
        self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)

    def reset(self, slots: np.ndarray) -> None:
        """Empties the rows of slots whose new sequences use penalties."""
        if not len(slots):
            return
        if not self.allocated:
            self._allocate()
            return
        rows = torch.from_numpy(slots.astype(np.int64)).to(self.device)
        self.prompt_mask[rows] = False
        self.output_counts[rows] = 0

    def observe(self, token_ids: torch.Tensor, slots: np.ndarray, is_prompt: np.ndarray) -> None:
        """Counts token_ids (int64, on the device) at batch slots `slots`, as prompt tokens
        where is_prompt, as outputs elsewhere. Slots must have been reset() first."""
        if not len(slots):
            return
        index = lambda a: torch.from_numpy(a.astype(np.int64)).to(self.device)  # noqa: E731
        prompt, output = np.flatnonzero(is_prompt), np.flatnonzero(~is_prompt)
        if len(prompt):
            self.prompt_mask[index(slots[prompt]), token_ids[index(prompt)]] = True
        if len(output):
            ones = torch.ones(len(output), dtype=torch.int32, device=self.device)
            # accumulate: a chunk may hold the same output token several times
            self.output_counts.index_put_((index(slots[output]), token_ids[index(output)]), ones, accumulate=True)

    def apply(self, logits: torch.Tensor, slots: torch.Tensor, repetition_penalty: torch.Tensor,
              presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor) -> torch.Tensor:
        """The penalised logits of rows whose sequences sit at `slots` (int64, on the device)."""
        return apply_penalties(logits, self.prompt_mask[slots], self.output_counts[slots],
                               repetition_penalty, presence_penalty, frequency_penalty)


@dataclass(slots=True)
class RowPenalties:
    """The rows of one step's logits whose sequences use penalties: the Sampler applies them (torch, or
    fused into its CUDA kernel, dataplane/sampling/fused_tail.py)."""

    state: PenaltyState
    rows: torch.Tensor  # i64 rows of the logits
    slots: torch.Tensor  # i64 their slots in the state
    args: dict[str, torch.Tensor]  # repetition_penalty, presence_penalty, frequency_penalty: f32 per row

    def apply_(self, logits: torch.Tensor) -> None:
        """In place on float logits [N, V]."""
        logits[self.rows] = self.state.apply(logits[self.rows], self.slots, **self.args)

    def per_row(self, num_rows: int) -> tuple[torch.Tensor, ...]:
        """(slot i64, repetition, presence, frequency f32), [num_rows] each: slot -1 and no penalty elsewhere."""
        def column(fill, values, dtype):
            full = torch.full((num_rows,), fill, dtype=dtype, device=self.rows.device)
            return full.index_copy_(0, self.rows, values.to(full.device, dtype))
        return (column(-1, self.slots, torch.int64), column(1.0, self.args["repetition_penalty"], torch.float32),
                column(0.0, self.args["presence_penalty"], torch.float32),
                column(0.0, self.args["frequency_penalty"], torch.float32))


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float; prompt_mask [R, V] bool; output_counts [R, V] int; one penalty per row.

    Repetition (HF): a token seen in the prompt or the output has its logit divided by
    the penalty when positive, multiplied when not. Then frequency and presence
    (OpenAI): logit -= frequency * count + presence * (count > 0), over the output."""
    in_output = output_counts > 0
    seen = prompt_mask | in_output
    rep = repetition_penalty.to(logits.dtype).unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - frequency_penalty.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
            - presence_penalty.to(logits.dtype).unsqueeze(1) * in_output.to(logits.dtype))


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
    """In place: logits[rows[i], token_ids[i]] = -inf (min_tokens keeps EOS and stop ids out)."""
    if rows.numel():
        logits[rows, token_ids] = float("-inf")  # a scalar: no host tensor to copy over
