"""From one step's hidden states to its StepResult: LM head, logit processors, Sampler, logprobs.

The order is vLLM v1's (docs/sampling.md):
1. logits of the rows that sample (float32 when a row asks for logprobs, and their raw logprobs);
2. min_tokens: EOS and stop ids of sequences short of min_tokens to -inf;
   then structured output's grammar bitmask (dataplane/sampling/grammar_mask.py);
3. the Sampler: penalties first (repetition, frequency, presence: dataplane/sampling/penalties.py;
   they leave -inf as it is, so the bans above may come first), then greedy argmax, or temperature,
   min-p, top-k, top-p and the race; on CUDA all in one kernel over the logits' own dtype;
4. logprobs of the sampled tokens, and prompt logprobs of flagged prefill rows.
Everything is batched over the rows that need it; the row sets were chosen on the
host by SamplingState (dataplane/sampling/sampling_state.py), so nothing here waits on the device: the
outputs stay there until the runner copies them back (dataplane/host_transfer.py).
Under tensor parallelism rank 0 broadcasts the sampled ids to the other ranks on the
device, so a rank > 0 can run the next decode step before any host has seen them.
"""
from __future__ import annotations

import torch

from dataplane.batch_state import BatchState, StepInputs
from dataplane.distributed import broadcast_from_rank0
from dataplane.sampling.grammar_mask import apply_grammar_bitmask
from dataplane.sampling.penalties import RowPenalties, ban_tokens
from dataplane.sampling.sampler import Sampler
from dataplane.sampling.logprobs import prompt_logprob_tensors, raw_logprobs, token_logprob_tensors

PROMPT_FIELDS = ("prompt_logprobs", "prompt_logprob_ranks", "prompt_top_token_ids", "prompt_top_logprobs")
SAMPLED_FIELDS = ("logprobs", "logprob_ranks", "top_token_ids", "top_logprobs")


class SamplingStep:
    def __init__(self, model: torch.nn.Module, batch: BatchState, sampler: Sampler,
                 generator: torch.Generator | None):
        self.model = model
        self.batch = batch
        self.sampler = sampler
        self.generator = generator

    def run(self, hidden: torch.Tensor, inputs: StepInputs) -> dict[str, torch.Tensor]:
        """Enqueues the step's sampling; returns its outputs still on the device, by StepResult field
        (int32 or float32). The host-side fields (slots, logprob_rows) are the caller's: inputs has them."""
        out: dict[str, torch.Tensor] = {}
        if inputs.prompt_logprobs is not None:
            p = inputs.prompt_logprobs
            out |= prompt_logprob_tensors(self.model.compute_logits, hidden, p.rows, p.token_ids,
                                          p.num_top).named(PROMPT_FIELDS)
        if len(inputs.sampled_slots) == 0:
            return out

        logits = self.model.compute_logits(inputs.sampled_hidden(hidden))
        s = inputs.sampling
        if len(s.logprob_rows):
            logits = logits.float()  # otherwise the sampler reads them as they are (the fused paths: no copy)
        raw = raw_logprobs(logits[inputs.logprob_index]) if len(s.logprob_rows) else None
        ban_tokens(logits, s.ban_rows, s.ban_token_ids)
        if inputs.grammar is not None:
            apply_grammar_bitmask(logits, *inputs.grammar)
        penalties = (RowPenalties(self.batch.sampling.penalties, inputs.penalty_index, s.penalty_slots, s.penalty_args)
                     if len(s.penalty_rows) else None)
        token_ids = self.sampler.sample(logits, **s.sampler_args, positions=s.positions, generator=self.generator,
                                        plan=inputs.sampler_plan, penalties=penalties)
        broadcast_from_rank0(token_ids)  # ranks > 0 feed them to their next decode step, as rank 0 does
        self.batch.record_sampled(inputs.sampled_slots, token_ids, inputs.sampled_index)
        out["token_ids"] = token_ids.to(torch.int32)
        if raw is not None:
            out |= token_logprob_tensors(raw, token_ids[inputs.logprob_index],
                                         s.num_top_logprobs).named(SAMPLED_FIELDS)
        return out

    def receive_leader_samples(self, inputs: StepInputs) -> None:
        """On ranks > 0: the ids rank 0 sampled this step (the broadcast in run), for the next decode step."""
        if len(inputs.sampled_slots):
            token_ids = torch.empty(len(inputs.sampled_slots), dtype=torch.long, device=self.batch.device)
            self.batch.record_sampled(inputs.sampled_slots, broadcast_from_rank0(token_ids), inputs.sampled_index)
