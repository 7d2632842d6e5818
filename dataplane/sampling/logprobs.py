"""Logprobs of the model's raw distribution, for sampled tokens and for prompt tokens.

"Raw" as in vLLM's default logprobs mode: log_softmax of the LM head's logits in
float32, before min_tokens, penalties, temperature and filters, so a logprob says what
the model thinks, not what the sampler did with it. Per token: its logprob, its rank
(1 + the number of tokens strictly more likely) and the N most likely tokens with
theirs, N the most any row of the step asked for (the control plane trims each row
to what its request asked). dataplane/sampling/sampling_step.py calls the *_tensors forms, which
stay on the device until the step's outputs are copied back together; the others return
numpy at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# rows of prompt logprobs computed at once: 256 × a 152k vocabulary is 156 MB of float32
PROMPT_ROWS_PER_CHUNK = 256


@dataclass(slots=True)
class LogprobArrays:
    logprobs: np.ndarray  # f32 [R]: of the given token
    ranks: np.ndarray  # i32 [R]
    top_token_ids: np.ndarray  # i32 [R * N], most likely first
    top_logprobs: np.ndarray  # f32 [R * N]


@dataclass(slots=True)
class LogprobTensors:
    """LogprobArrays' fields still on the device (4-byte dtypes), to be copied back with a step's other outputs."""

    logprobs: torch.Tensor  # f32 [R]
    ranks: torch.Tensor  # i32 [R]
    top_token_ids: torch.Tensor  # i32 [R * N]
    top_logprobs: torch.Tensor  # f32 [R * N]

    @classmethod
    def concat(cls, parts: list["LogprobTensors"]) -> "LogprobTensors":
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in cls.__slots__))

    def named(self, names: tuple[str, str, str, str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, (self.logprobs, self.ranks, self.top_token_ids, self.top_logprobs)))

    def to_host(self) -> LogprobArrays:
        return LogprobArrays(*(getattr(self, name).cpu().numpy() for name in self.__slots__))


def token_logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobTensors:
    """logprobs [R, V] (a log_softmax), token_ids [R]: each row's token's logprob and rank, and its top num_top."""
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_logprobs, top_ids = logprobs.topk(num_top, dim=1) if num_top else (logprobs[:, :0], logprobs[:, :0].long())
    return LogprobTensors(chosen.reshape(-1).float(), ranks.to(torch.int32), top_ids.reshape(-1).to(torch.int32),
                          top_logprobs.reshape(-1).float())


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobArrays:
    return token_logprob_tensors(logprobs, token_ids, num_top).to_host()


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1)


def prompt_logprob_tensors(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           rows: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobTensors:
    """Logprobs of token_ids[i] under the logits of hidden state rows[i], a chunk of rows
    at a time (a long prompt chunk would not fit the vocabulary-wide log_softmax at once)."""
    parts = []
    for start in range(0, len(rows), PROMPT_ROWS_PER_CHUNK):
        chunk = slice(start, start + PROMPT_ROWS_PER_CHUNK)
        logprobs = raw_logprobs(compute_logits(hidden[rows[chunk]]))
        parts.append(token_logprob_tensors(logprobs, token_ids[chunk], num_top))
    return LogprobTensors.concat(parts)


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    rows: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobArrays:
    return prompt_logprob_tensors(compute_logits, hidden, rows, token_ids, num_top).to_host()
