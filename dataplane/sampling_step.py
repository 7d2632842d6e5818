"""From one step's hidden states to its StepResult: LM head, logit processors, Sampler, logprobs.

The order is vLLM v1's (docs/sampling.md):
1. logits of the rows that sample, in float32; raw logprobs of those that asked;
2. min_tokens: EOS and stop ids of sequences short of min_tokens to -inf;
3. penalties: repetition, frequency, presence (dataplane/layers/penalties.py);
4. the Sampler: greedy argmax, or temperature, min-p, top-k, top-p and the race;
5. logprobs of the sampled tokens, and prompt logprobs of flagged prefill rows.
Everything is batched over the rows that need it; the row sets were chosen on the
host by SlotSamplingParams, so nothing here waits on the device to decide.
"""
from __future__ import annotations

import torch

from dataplane.batch_state import BatchState, StepInputs
from dataplane.layers.penalties import ban_tokens
from dataplane.layers.sampler import Sampler
from dataplane.logprobs import prompt_logprobs, raw_logprobs, token_logprobs
from proto.step import StepResult


class SamplingStep:
    def __init__(self, model: torch.nn.Module, batch: BatchState, sampler: Sampler,
                 generator: torch.Generator | None):
        self.model = model
        self.batch = batch
        self.sampler = sampler
        self.generator = generator

    def run(self, step_id: int, hidden: torch.Tensor, inputs: StepInputs) -> StepResult:
        result = StepResult(step_id=step_id)
        if inputs.prompt_logprobs is not None:
            p = inputs.prompt_logprobs
            arrays = prompt_logprobs(self.model.compute_logits, hidden, p.rows, p.token_ids, p.num_top)
            result.prompt_logprobs, result.prompt_logprob_ranks = arrays.logprobs, arrays.ranks
            result.prompt_top_token_ids, result.prompt_top_logprobs = arrays.top_token_ids, arrays.top_logprobs
        if len(inputs.sampled_slots) == 0:
            return result

        logits = self.model.compute_logits(hidden[inputs.sample_indices]).float()
        s = inputs.sampling
        device = logits.device
        raw = None
        if len(s.logprob_rows):
            logprob_rows = torch.from_numpy(s.logprob_rows).to(device)
            raw = raw_logprobs(logits[logprob_rows])
        ban_tokens(logits, s.ban_rows, s.ban_token_ids)
        if len(s.penalty_rows):
            rows = torch.from_numpy(s.penalty_rows).to(device)
            logits[rows] = self.batch.penalties.apply(logits[rows], s.penalty_slots, s.repetition_penalty,
                                                      s.presence_penalty, s.frequency_penalty)
        token_ids = self.sampler.sample(logits, s.temperature, s.top_p, s.top_k, s.seed, s.has_seed, s.positions,
                                        generator=self.generator, min_p=s.min_p)
        self.batch.record_sampled(inputs.sampled_slots, token_ids)

        result.slots = inputs.sampled_slots
        result.token_ids = token_ids.to("cpu", dtype=torch.int32).numpy()
        if raw is not None:
            arrays = token_logprobs(raw, token_ids[logprob_rows], s.num_top_logprobs)
            result.logprob_rows = s.logprob_rows.astype("<i4")
            result.logprobs, result.logprob_ranks = arrays.logprobs, arrays.ranks
            result.top_token_ids, result.top_logprobs = arrays.top_token_ids, arrays.top_logprobs
        return result
