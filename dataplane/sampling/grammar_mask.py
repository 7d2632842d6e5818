"""Structured output on the data plane: ban the tokens a row's grammar does not allow, before sampling.

The control plane sends, for the constrained rows that sample this step, their indices
among the step's sampled rows and one packed bitmask each (bit j of int32 word i allows
token 32 * i + j; tokens past the mask, such as a padded LM head's, are banned):
proto/step.py's grammar_rows / grammar_bitmask. Banned logits become -inf in place, before
the Sampler (whose penalties leave -inf as it is), so every strategy (greedy, top-k/p, min-p, the fused
Gumbel-max) picks an allowed token; raw logprobs are taken earlier and stay the model's.
On CUDA a Triton kernel writes only the banned entries (grammar_mask_kernel.py); elsewhere
torch unpacks the bits.
"""
from __future__ import annotations

import torch

try:
    from dataplane.sampling import grammar_mask_kernel
except ImportError:  # no triton: the torch path everywhere
    grammar_mask_kernel = None

BITS_PER_WORD = 32


def apply_grammar_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [num_sampled, vocab]; rows int64 [n] into them; bitmask int32 [n, words]. In place."""
    if not len(rows):
        return
    if grammar_mask_kernel is not None and grammar_mask_kernel.enabled_for(logits) and logits.stride(1) == 1:
        grammar_mask_kernel.apply(logits, rows, bitmask)
    else:
        apply_grammar_bitmask_torch(logits, rows, bitmask)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [n, vocab_size]: the unpacked bitmask, False past its last word."""
    n, words = bitmask.shape
    shifts = torch.arange(BITS_PER_WORD, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, words * BITS_PER_WORD)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)


def apply_grammar_bitmask_torch(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    allowed = allowed_tokens(bitmask, logits.shape[1])
    picked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, picked)
