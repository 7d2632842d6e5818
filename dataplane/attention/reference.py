"""The torch reference attention over the paged KV cache: the CPU path and the oracle for kernels.

`store_kv` writes the new tokens' keys and values into their cache slots; `paged_attention`
lets each sequence's new tokens attend causally over its whole context, read back from
the cache through its block table (layout in dataplane/context.py). Decode-only
sequences (one new token) run as one padded, masked batch; the others, prefills and
prefill chunks, run one at a time through torch SDPA. Everything is computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataplane.context import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [num_tokens, num_kv_heads, head_dim] -> caches [num_blocks, block_size, num_kv_heads, head_dim]."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # boolean indexing syncs a GPU with the host; fine for the reference, the kernels avoid it
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[valid].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[valid].to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, H, D], block_ids [..., n] -> [..., n * bs, H, D] in fp32."""
    blocks = cache[block_ids]
    return blocks.reshape(*block_ids.shape[:-1], -1, *cache.shape[-2:]).float()


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, max_seq_len: int, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence) -> out [B, Hq, D] fp32."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    batch, num_heads = q.shape[:2]
    group = num_heads // num_kv_heads
    max_blocks = -(-max_seq_len // block_size)
    # entries past a sequence's last block are arbitrary: clamp them to a real block, the mask hides it
    block_ids = block_tables[:, :max_blocks].long().clamp(0, num_blocks - 1)
    k = _gather_context(k_cache, block_ids)  # [B, L, Hkv, D]
    v = _gather_context(v_cache, block_ids)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    key_pos = torch.arange(k.shape[1], device=q.device)
    # a padding sequence of length 0 still sees key 0, so its row stays finite
    masked = key_pos[None, :] >= seq_lens.long().clamp(min=1)[:, None]  # [B, L]
    scores.masked_fill_(masked[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(batch, num_heads, head_dim)


def _prefill_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_len: int, scale: float) -> torch.Tensor:
    """q [q_len, Hq, D] of one sequence whose context after this step is seq_len -> out [q_len, Hq, D] fp32."""
    block_size = k_cache.shape[1]
    q_len = q.shape[0]
    num_blocks_used = -(-seq_len // block_size)
    block_ids = block_table[:num_blocks_used].long()
    k = _gather_context(k_cache, block_ids)[:seq_len]  # [seq_len, Hkv, D]
    v = _gather_context(v_cache, block_ids)[:seq_len]
    # query j sits at position seq_len - q_len + j: causal mask aligned bottom-right
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    allowed = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim] in q's dtype."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)

    if meta.is_decode_only:  # every sequence runs exactly one token: token i belongs to sequence i
        num_seqs = meta.num_seqs
        out[:num_seqs] = _decode_batch(q[:num_seqs], k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.max_seq_len, scale)
        # tokens past the last sequence are padding (e.g. of a captured batch): zeros, not uninitialised memory
        out[num_seqs:] = 0
        return out.to(q.dtype)

    query_start_loc = meta.query_start_loc_cpu
    if query_start_loc is None:
        query_start_loc = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu
    if seq_lens is None:
        seq_lens = meta.seq_lens.tolist()
    decode_seqs, decode_tokens = [], []
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end - start == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        elif end > start:
            out[start:end] = _prefill_one(q[start:end], k_cache, v_cache, meta.block_tables[i], seq_len, scale)
    if decode_seqs:
        seq_idx = torch.tensor(decode_seqs, device=q.device)
        token_idx = torch.tensor(decode_tokens, device=q.device)
        lens = [seq_lens[i] for i in decode_seqs]
        out[token_idx] = _decode_batch(q[token_idx], k_cache, v_cache, meta.block_tables[seq_idx],
                                       meta.seq_lens[seq_idx], max(lens), scale)
    out[query_start_loc[-1]:] = 0
    return out.to(q.dtype)
