"""The grammar bitmask as a Triton kernel: -inf into each banned logit of the constrained rows.

One program per (constrained row, block of the vocabulary): it reads the block's bitmask
words and stores only where a bit is 0, so an allowed-heavy row costs a read of its mask.
Tested against the torch path under TRITON_INTERPRET=1 (tests/dataplane/test_grammar_mask.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.layers.fused_ops import enabled_for  # noqa: F401  (grammar_mask asks it)

BLOCK = 4096


@triton.jit(do_not_specialize=["vocab_size", "words"])
def grammar_mask_kernel(logits_ptr, stride_row, rows_ptr, bitmask_ptr, vocab_size, words, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + i).to(tl.int64)
    in_vocab = offs < vocab_size
    word = tl.load(bitmask_ptr + i.to(tl.int64) * words + offs // 32, mask=in_vocab & (offs // 32 < words), other=0)
    banned = ((word >> (offs % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_row + offs, float("-inf"), mask=in_vocab & banned)


def apply(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    n, words = bitmask.shape
    vocab_size = logits.shape[1]
    bitmask = bitmask.contiguous()
    grid = (n, triton.cdiv(vocab_size, BLOCK))
    grammar_mask_kernel[grid](logits, logits.stride(0), rows, bitmask, vocab_size, words, BLOCK=BLOCK)
