"""The "cpu" attention backend: paged attention for the CPU with a few torch ops per layer.

The torch reference (reference.py, the oracle) rebuilds each sequence's context from whole
blocks in every layer, with the mask and the block indices built again each time. Here
what depends only on the step's metadata is built once per forward (`CpuAttentionPlan`,
shared by every layer): for each query group, the cache slots of exactly the context tokens
it reads, and its mask. A layer then runs two `index_copy_`
(store), two `index_select` of just those tokens out of the cache, and one torch SDPA call
for all decode rows together; each prefill chunk is one more SDPA call. Computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataplane.context import AttentionMetadata


@dataclass(slots=True)
class ContextGroup:
    """Query rows that attend together: `num_seqs` sequences padded to `context_len` keys each."""

    query_rows: torch.Tensor | slice  # rows of q this group answers
    context_slots: torch.Tensor  # int64 [num_seqs * context_len]: cache slot of each key (padding: a real slot)
    mask: torch.Tensor | None  # bool [num_seqs, 1, q_len, context_len], True = may attend; None = all keys
    num_seqs: int
    context_len: int


@dataclass(slots=True)
class CpuAttentionPlan:
    decode: ContextGroup | None  # every one-token sequence, batched
    prefills: list[ContextGroup]  # one per sequence with more than one new token
    num_query_tokens: int  # rows past it are padding: zeros in the output


def _context_slots(block_table: torch.Tensor, block_size: int, context_len: int) -> torch.Tensor:
    """block_table [num_seqs, n] -> int64 [num_seqs, context_len]: slot of token t of each sequence."""
    pos = torch.arange(context_len, device=block_table.device)
    blocks = block_table[:, pos // block_size].long()
    return blocks * block_size + pos % block_size


def _decode_group(meta: AttentionMetadata, seq_idx: list[int], query_rows, lens: list[int],
                  block_size: int) -> ContextGroup:
    context_len = max(max(lens), 1)
    table = meta.block_tables if len(seq_idx) == meta.num_seqs else meta.block_tables[seq_idx]
    slots = _context_slots(table, block_size, context_len)
    pos = torch.arange(context_len, device=slots.device)[None, :]
    seq_lens = torch.tensor(lens, device=slots.device)[:, None]
    # keys past a sequence's end may point anywhere in its table, even at no block: read its first slot instead
    # (slot 0 for a padding sequence, whose table may hold no block at all)
    first = torch.where(seq_lens > 0, slots[:, :1], 0)
    slots = torch.where(pos < seq_lens, slots, first)
    # a padding sequence of length 0 still sees key 0, so its row stays finite (as the reference)
    visible = pos < seq_lens.clamp(min=1)
    mask = None if min(lens) == context_len else visible[:, None, None, :]
    return ContextGroup(query_rows, slots.reshape(-1), mask, len(seq_idx), context_len)


def _prefill_group(meta: AttentionMetadata, i: int, start: int, end: int, seq_len: int,
                   block_size: int) -> ContextGroup:
    q_len = end - start
    slots = _context_slots(meta.block_tables[i:i + 1], block_size, seq_len)
    # query j sits at position seq_len - q_len + j: causal mask aligned bottom-right
    q_pos = torch.arange(seq_len - q_len, seq_len, device=slots.device)
    allowed = torch.arange(seq_len, device=slots.device)[None, :] <= q_pos[:, None]
    return ContextGroup(slice(start, end), slots.reshape(-1), allowed[None, None], 1, seq_len)


def build_plan(meta: AttentionMetadata, block_size: int) -> CpuAttentionPlan:
    query_start_loc = meta.query_start_loc_cpu
    if query_start_loc is None:
        query_start_loc = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu
    if seq_lens is None:
        seq_lens = meta.seq_lens.tolist()
    decode_seqs, decode_rows, prefills = [], [], []
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end - start == 1:
            decode_seqs.append(i)
            decode_rows.append(start)
        elif end > start:
            prefills.append(_prefill_group(meta, i, start, end, seq_len, block_size))
    decode = None
    if decode_seqs:
        num = len(decode_seqs)
        rows = slice(0, num) if decode_rows == list(range(num)) else torch.tensor(decode_rows, device=meta.seq_lens.device)
        decode = _decode_group(meta, decode_seqs, rows, [seq_lens[i] for i in decode_seqs], block_size)
    return CpuAttentionPlan(decode, prefills, query_start_loc[-1])


# Every layer of a forward passes the same metadata (and slot_mapping) objects: the first builds, the rest reuse.
_plan_cache: tuple[AttentionMetadata, int, CpuAttentionPlan] | None = None
_store_cache: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None


def plan_for(meta: AttentionMetadata, block_size: int) -> CpuAttentionPlan:
    global _plan_cache
    if _plan_cache is None or _plan_cache[0] is not meta or _plan_cache[1] != block_size:
        _plan_cache = (meta, block_size, build_plan(meta, block_size))
    return _plan_cache[2]


def _store_rows_and_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """-> (rows of k/v to write, None for every row; their slots): padding rows (slot -1) are skipped."""
    global _store_cache
    if _store_cache is None or _store_cache[0] is not slot_mapping:
        valid = slot_mapping >= 0
        if bool(valid.all()):
            _store_cache = (slot_mapping, None, slot_mapping)
        else:
            rows = valid.nonzero().squeeze(1)
            _store_cache = (slot_mapping, rows, slot_mapping[rows])
    return _store_cache[1], _store_cache[2]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [num_tokens, num_kv_heads, head_dim] -> caches [num_blocks, block_size, num_kv_heads, head_dim]."""
    rows, slots = _store_rows_and_slots(slot_mapping)
    if rows is not None:
        k, v = k[rows], v[rows]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _read_context(cache: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    """-> fp32 [num_seqs, num_kv_heads, context_len, head_dim], a view over the selected tokens."""
    num_kv_heads, head_dim = cache.shape[-2:]
    tokens = cache.view(-1, num_kv_heads, head_dim)
    if tokens.dtype.itemsize == 1:  # float8: index_select has no kernel for it on CPU, bytes it has
        picked = tokens.view(torch.uint8).index_select(0, group.context_slots).view(cache.dtype)
    else:
        picked = tokens.index_select(0, group.context_slots)
    return picked.float().view(group.num_seqs, group.context_len, num_kv_heads, head_dim).transpose(1, 2)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: ContextGroup,
            scale: float) -> torch.Tensor:
    """q [num_seqs, q_len, Hq, D] of the group -> out [num_seqs, q_len, Hq, D] fp32."""
    num_seqs, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = _read_context(k_cache, group)
    v = _read_context(v_cache, group)
    if q_len == 1:
        # one token: the q heads sharing a kv head become that head's query rows, so no K/V is repeated
        qg = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask, scale=scale)
        return out.reshape(num_seqs, 1, num_heads, head_dim)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=group.mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out [num_tokens, num_heads, head_dim] in q's dtype."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    plan = plan_for(meta, k_cache.shape[1])
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if plan.decode is not None:
        group = plan.decode
        out[group.query_rows] = _attend(q[group.query_rows].unsqueeze(1), k_cache, v_cache, group, scale).squeeze(1)
    for group in plan.prefills:
        out[group.query_rows] = _attend(q[group.query_rows].unsqueeze(0), k_cache, v_cache, group, scale).squeeze(0)
    out[plan.num_query_tokens:] = 0
    return out.to(q.dtype)
