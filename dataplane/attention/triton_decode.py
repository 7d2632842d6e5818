"""Paged decode attention in Triton: one new query token per sequence, keys from the paged KV cache.

Each program handles one (sequence, KV head, split) and all query heads of that GQA group,
so each KV tile is read from memory once per KV head, not once per query head. Softmax is
online, in fp32, in base 2. When the batch alone cannot fill the GPU (few sequences times
few KV heads) the context is split across programs (flash-decoding): every split writes its
normalised partial output and log-sum-exp, and `decode_reduce_kernel` merges the splits.
Correctness never depends on the number of splits (a split past the end of a short sequence
writes an empty partial), so a CUDA graph captured with one split count stays right for any
context length. Called by triton_backend.py when every sequence runs one token; the prefill
kernel (triton_prefill.py) handles everything else.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dataplane.attention.triton_store_kv import check_kv_cache

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (its q load, partial write, reduce) dominates
MAX_SPLITS = 32
TARGET_PROGRAMS_PER_SM = 2  # H100: 2 programs of 4 warps per SM already stream the cache at ~95% of copy bandwidth


@triton.jit
def paged_decode_kernel(
    q_ptr, q_stride_t, q_stride_h,
    k_cache_ptr, v_cache_ptr,
    block_tables_ptr, block_tables_stride,
    seq_lens_ptr,
    out_ptr, out_stride_t, out_stride_h,
    mid_out_ptr, mid_lse_ptr,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = kv_head * GROUP_SIZE + tl.arange(0, BLOCK_H)
    head_mask = tl.arange(0, BLOCK_H) < GROUP_SIZE
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offsets = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
        kv_mask = n_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)  # FP8 cache: upcast per tile
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one key of this split
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i == 0: an empty split, or seq_len 0 (padding)
    mask = head_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq.to(tl.int64) * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial = (seq.to(tl.int64) * (NUM_KV_HEADS * GROUP_SIZE) + heads) * NUM_SPLITS + split
        tl.store(mid_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], out, mask=mask)
        lse = m + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))  # -inf for an empty split: m is still -inf
        tl.store(mid_lse_ptr + partial, lse, mask=head_mask)


@triton.jit
def decode_reduce_kernel(
    mid_out_ptr, mid_lse_ptr, out_ptr, out_stride_t, out_stride_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    partial = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(mid_lse_ptr + partial, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: seq_len 0
    weight = tl.math.exp2(lse - lse_max)
    part = tl.load(mid_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :],
                   mask=(splits[:, None] < NUM_SPLITS) & (dims[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq.to(tl.int64) * out_stride_t + head * out_stride_h + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) so that about TARGET_PROGRAMS_PER_SM programs run per SM."""
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(TARGET_PROGRAMS_PER_SM * num_sms, max(programs, 1))
    useful = triton.cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, max_seq_len: int, scale: float, out: torch.Tensor | None = None,
                 num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                 num_stages: int = 3) -> torch.Tensor:
    """q `[num_seqs, num_heads, head_dim]` (token i belongs to sequence i) -> out of the same shape."""
    num_seqs, num_heads, head_dim = q.shape
    check_kv_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, f"q has head_dim {head_dim} but the cache {cache_head_dim}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    assert q.dtype == k_cache.dtype or k_cache.dtype == torch.float8_e4m3fn, \
        f"q is {q.dtype} but the cache is {k_cache.dtype}"
    assert q.stride(-1) == 1, "q must have a contiguous last dimension"
    assert seq_lens.shape == (num_seqs,) and seq_lens.dtype == torch.int32, \
        f"seq_lens must be int32 [{num_seqs}] (one per query token), got {seq_lens.dtype} {tuple(seq_lens.shape)}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.dtype == torch.int32 \
        and block_tables.stride(1) == 1, "block_tables must be int32 [num_seqs, max_blocks] with contiguous rows"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group_size = num_heads // num_kv_heads
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 1
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms)
    if num_splits > 1:
        mid_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        mid_out = mid_lse = out  # unused
    block_d = max(16, triton.next_power_of_2(head_dim))
    paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, q.stride(0), q.stride(1),
        k_cache, v_cache,
        block_tables, block_tables.stride(0),
        seq_lens,
        out, out.stride(0), out.stride(1),
        mid_out, mid_lse,
        scale * LOG2E,
        NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, BLOCK_H=max(16, triton.next_power_of_2(group_size)), BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        decode_reduce_kernel[(num_seqs, num_heads)](
            mid_out, mid_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out
