"""Varlen prefill attention in Triton whose keys come from the paged KV cache.

The batch is the varlen layout of dataplane/context.py: sequence i owns query tokens
`query_start_loc[i]:query_start_loc[i+1]` and, after this step's K/V were stored, its cache
holds `seq_lens[i]` tokens. So one kernel serves a first prefill, a chunk of a long prompt,
a prompt whose prefix came from the prefix cache, and decode rows mixed into the same batch:
query token j of a sequence with q_len new tokens sits at position seq_len - q_len + j and
sees keys 0..that position.

A program owns one KV head and a tile of BLOCK_M rows, each row a (query token, query head
of the GQA group) pair, so a key tile is read once for the whole group. Programs walk a flat
grid of query tiles (`find_seq_idx` turns a tile number into its sequence, as vLLM's unified
Triton attention does), so a batch of one long chunk and many decodes launches no idle
programs per sequence. Keys below the tile's first query position need no causal mask and
take the cheaper loop; a sequence's last query tiles, which see the most keys, run
first. Any head_dim up to 256 works (padded to a power of two, at least 16).
Called by triton_backend.py; pure decode batches go to triton_decode.py instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.attention.triton_store_kv import check_kv_cache

LOG2E = 1.4426950408889634


@triton.jit
def find_seq_idx(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence i owns tiles [query_start_loc[i] // BLOCK_Q + i, ...): the last i whose first tile <= q_tile.
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def attend_tile(acc, l_i, m, q, pos, k_cache_ptr, v_cache_ptr, block_table, kv_head, tile_start, seq_len, dims,
                qk_scale, CAUSAL: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < seq_len
    page = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    slot = page * BLOCK_SIZE + offs_n % BLOCK_SIZE
    kv_offsets = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
    kv_mask = n_mask[:, None] & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)  # FP8 cache: upcast per tile
    v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where((offs_n[None, :] <= pos[:, None]) & n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# one compiled variant for every batch: Triton would otherwise compile one per combination of
# "== 1" and "% 16 == 0" of these, mid-run, on the first step that has it (~1 s each on an H100)
@triton.jit(do_not_specialize=["num_seqs", "block_tables_stride"])
def paged_prefill_kernel(
    q_ptr, q_stride_t, q_stride_h,
    k_cache_ptr, v_cache_ptr,
    block_tables_ptr, block_tables_stride,
    query_start_loc_ptr, seq_lens_ptr, num_seqs,
    out_ptr, out_stride_t, out_stride_h,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_seq_idx(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = q_tile - (q_start // BLOCK_Q + seq)
    num_tiles = tl.cdiv(q_len, BLOCK_Q)
    if local_tile >= num_tiles:  # the flat grid is an upper bound on the tile count
        return
    local_tile = num_tiles - 1 - local_tile  # the first programs launched take the longest (last) tiles
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step

    rows = tl.arange(0, BLOCK_M)
    token = local_tile * BLOCK_Q + rows // GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    row_mask = (rows < BLOCK_Q * GROUP_SIZE) & (token < q_len)
    pos = context_len + token
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    first_pos = context_len + local_tile * BLOCK_Q
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc, l_i, m = attend_tile(acc, l_i, m, q, pos, k_cache_ptr, v_cache_ptr, block_table, kv_head, tile_start,
                                  seq_len, dims, qk_scale, False, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                  DOT_PRECISION)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        acc, l_i, m = attend_tile(acc, l_i, m, q, pos, k_cache_ptr, v_cache_ptr, block_table, kv_head, tile_start,
                                  seq_len, dims, qk_scale, True, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                  DOT_PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def default_config(head_dim: int, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: small tiles run fastest
        return dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    # measured on an H100 with benchmarks/attention_kernels.py --sweep
    if head_dim <= 64:
        return dict(block_m=64, block_n=128, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q `[num_tokens, num_heads, head_dim]` -> out of the same shape (rows past query_start_loc[-1] untouched)."""
    num_tokens, num_heads, head_dim = q.shape
    check_kv_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert cache_head_dim == head_dim, f"q has head_dim {head_dim} but the cache {cache_head_dim}"
    assert head_dim <= 256, f"head_dim {head_dim} > 256 is not supported"
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    assert q.dtype == k_cache.dtype or k_cache.dtype == torch.float8_e4m3fn, \
        f"q is {q.dtype} but the cache is {k_cache.dtype}"
    assert q.stride(-1) == 1, "q must have a contiguous last dimension"
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype == torch.int32, \
        f"query_start_loc must be int32 [{num_seqs + 1}], got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
    assert seq_lens.dtype == torch.int32, f"seq_lens must be int32, got {seq_lens.dtype}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.dtype == torch.int32 \
        and block_tables.stride(1) == 1, "block_tables must be int32 [num_seqs, max_blocks] with contiguous rows"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    group_size = num_heads // num_kv_heads
    config = default_config(head_dim, q.device)
    block_m = block_m or config["block_m"]
    block_m = max(block_m, triton.next_power_of_2(group_size))
    block_q = block_m // group_size
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)  # >= the sum over sequences of cdiv(q_len, block_q)
    paged_prefill_kernel[grid](
        q, q.stride(0), q.stride(1),
        k_cache, v_cache,
        block_tables, block_tables.stride(0),
        query_start_loc, seq_lens, num_seqs,
        out, out.stride(0), out.stride(1),
        scale * LOG2E,
        NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n or config["block_n"],
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or config["num_warps"], num_stages=num_stages or config["num_stages"],
    )
    return out
