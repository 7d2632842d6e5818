"""Attention metadata for one forward pass, set by the runner and read by every Attention layer.

The batch is a flat list of tokens from several sequences (varlen layout):
sequence i owns query tokens query_start_loc[i]:query_start_loc[i+1], and after
this step its KV cache holds seq_lens[i] tokens, the new ones last. The KV cache of a
layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; token t of sequence i
lives at slot `block_tables[i, t // block_size] * block_size + t % block_size`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token; -1 = padding, not written
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: cu_seqlens_q
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], unused entries arbitrary
    max_query_len: int
    max_seq_len: int
    # CPU copies for code that must not sync with the device (the torch reference loops over sequences)
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


_current: AttentionMetadata | None = None


def get_context() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside a forward pass: no AttentionMetadata is set")
    return _current


@contextmanager
def forward_context(meta: AttentionMetadata):
    global _current
    previous, _current = _current, meta
    try:
        yield meta
    finally:
        _current = previous
