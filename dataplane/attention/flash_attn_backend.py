"""The "flash-attn" attention backend: FlashAttention-2's paged kernels, as Nano-vLLM uses them.

Decode-only batches go to `flash_attn_with_kvcache` (q as [num_seqs, 1, heads, dim], the
cache with `cache_seqlens` and `block_table`); everything else, mixed batches included, to
`flash_attn_varlen_func` with `block_table`, which reads every key, the cached prefix
included, from the paged cache (flash-attn >= 2.5.7 takes `block_table` there). Both align
the causal mask bottom-right, which is the position rule of dataplane/context.py. K/V are
stored by the Triton kernel of triton_store_kv.py when Triton is importable, else by the
torch reference. flash-attn's paged kernels need a block_size that is a multiple of 256 and
fp16/bf16 tensors: `check_supported` says so before the first step, and `forward` refuses
anything else with the same message. Importing this module registers the backend only when
`flash_attn` imports and a CUDA GPU is present.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataplane.attention import AttentionBackend, reference, register_backend
from dataplane.context import AttentionMetadata

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:  # not installed (or built for another torch): the backend does not exist here
    flash_attn_varlen_func = flash_attn_with_kvcache = None

try:
    from dataplane.attention.triton_store_kv import store_kvcache as store_kv
except ImportError:
    store_kv = reference.store_kv

PAGE_MULTIPLE = 256  # flash-attn 2 checks "Paged KV cache block size must be divisible by 256"


def check_supported(block_size: int, dtype: torch.dtype) -> None:
    if block_size % PAGE_MULTIPLE:
        raise ValueError(f"the flash-attn backend needs a KV block_size that is a multiple of {PAGE_MULTIPLE} "
                         f"(got {block_size}): use --block-size 256 or --attention-backend triton")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the flash-attn backend runs fp16/bf16 only (got {dtype}): use --dtype bfloat16 "
                         "or --attention-backend triton")


def forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim] in q's dtype."""
    check_supported(k_cache.shape[1], k_cache.dtype)
    num_seqs = meta.num_seqs
    if meta.max_query_len == 1:  # token i belongs to sequence i; tokens past num_seqs pad a captured batch
        out = torch.empty_like(q)
        out[:num_seqs] = flash_attn_with_kvcache(
            q[:num_seqs].unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
            block_table=meta.block_tables, softmax_scale=scale, causal=True).squeeze(1)
        out[num_seqs:] = 0
        return out
    cu_seqlens_k = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale, causal=True,
        block_table=meta.block_tables)
    # rows past the last query token are padding that flash-attn leaves unwritten; zero them without a sync
    padding = torch.arange(q.shape[0], device=q.device) >= meta.query_start_loc[-1]
    return out.masked_fill_(padding[:, None, None], 0)


if flash_attn_varlen_func is not None and torch.cuda.is_available():
    register_backend(AttentionBackend("flash-attn", store_kv, forward))
