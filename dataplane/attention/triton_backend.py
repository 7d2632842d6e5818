"""The "triton" attention backend: Triton kernels for storing K/V and for paged attention.

`store_kv` is triton_store_kv.py's kernel; `forward` runs the decode kernel
(triton_decode.py) when every sequence has one new token and the varlen prefill kernel
(triton_prefill.py) otherwise, mixed batches of chunks and decodes included. Both read the
metadata contract of dataplane/context.py and return rows past the batch's last query
token zeroed, as the torch reference does. Importing this module registers the backend
with dataplane.attention when Triton is importable and can run here (a CUDA GPU, or the
interpreter with TRITON_INTERPRET=1); otherwise it registers nothing.
"""
from __future__ import annotations

import os

import torch

from dataplane.attention import AttentionBackend, register_backend
from dataplane.context import AttentionMetadata

try:
    import triton  # noqa: F401
except ImportError:  # no Triton: the backend simply does not exist here
    triton = None

if triton is not None:
    from dataplane.attention.triton_decode import paged_decode
    from dataplane.attention.triton_prefill import paged_prefill
    from dataplane.attention.triton_store_kv import store_kvcache


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim] in q's dtype."""
    assert q.dim() == 3, f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}"
    num_seqs = meta.num_seqs
    if meta.max_query_len == 1:  # token i belongs to sequence i; tokens past num_seqs pad a captured batch
        assert q.shape[0] >= num_seqs, f"decode batch of {num_seqs} sequences but only {q.shape[0]} query tokens"
        out = torch.empty_like(q)
        paged_decode(q[:num_seqs], k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                     out=out[:num_seqs])
        out[num_seqs:] = 0
        return out
    if meta.query_start_loc_cpu is not None:
        out = torch.empty_like(q)
        out[meta.query_start_loc_cpu[-1]:] = 0
    else:  # which rows are padding is only known on the device; zero them all rather than sync
        out = torch.zeros_like(q)
    return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale, out=out)


def runnable_here() -> bool:
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if runnable_here():
    register_backend(AttentionBackend("triton", store_kv, forward))
