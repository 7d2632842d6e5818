"""The experts of an MoE layer as two grouped GEMMs in Triton (the GPU path of layers/moe.py).

The design of vLLM's fused_moe, written anew: the T * k (token, expert) pairs are sorted by
expert and each expert's run is padded to a multiple of BLOCK_M (`align_by_expert`), so every
BLOCK_M rows of the sorted order belong to one expert. One kernel launch then multiplies each
block of rows by its expert's weights: first x [T, H] by w13 ([E, 2I, H], gate and up) into
[T * k, 2I], then, after SiLU-and-mul, [T * k, I] by w2 ([E, H, I]) into [T * k, H] scaled by the
routing weight; the k rows of a token are summed last. Only the experts that tokens chose are
read, each once per BLOCK_M rows of its tokens.

Every size is fixed by T, k, E and BLOCK_M (no host synchronisation), so the step can be
captured in a CUDA graph; the kernel skips the blocks past the real padded length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.layers.activation import SiluAndMul

_silu_and_mul = SiluAndMul()


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    N, num_valid_pairs,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    K: tl.constexpr,  # the model's hidden or intermediate size: one compilation each
    A_ROWS_PER_TOKEN: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[pair] = a[pair // A_ROWS_PER_TOKEN] @ b[expert of pair].T (times the pair's routing weight)."""
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    block_m = pid // num_blocks_n
    block_n = pid % num_blocks_n
    if block_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + rows).to(tl.int64)
    row_valid = pairs < num_valid_pairs  # padding rows carry num_valid_pairs
    expert = tl.load(block_expert_ids_ptr + block_m).to(tl.int64)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // A_ROWS_PER_TOKEN)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = ks + k0 < K
        a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + pairs, mask=row_valid, other=0.0)
        acc = acc * weight.to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_pair_ids [P], block_expert_ids [P / block_m], num_padded [1]).

    sorted_pair_ids lists the pairs (t * k + j) expert by expert, each expert's run padded to a multiple
    of block_m with the value T * k; block_expert_ids[b] is the expert of rows b * block_m ...; P is the
    most padding could need, T * k + E * (block_m - 1) rounded up; num_padded the length really used."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    # a pair's rank among its expert's pairs = its index in the sorted order - where its expert begins
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - starts[sorted_experts]
    capacity = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pair_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[padded_starts[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    # blocks past the last expert's run get expert E - 1: the kernel skips them by num_padded anyway
    block_expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pair_ids, block_expert_ids.to(torch.int32), padded_ends[-1:].to(torch.int32)


def _block_sizes(num_pairs: int, n: int) -> tuple[int, int, int]:
    # small batches (decode) waste less padding with short blocks; tl.dot needs at least 16
    block_m = 16 if num_pairs <= 64 * 8 else 64
    return block_m, min(128, max(16, triton.next_power_of_2(n))), 64


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned, block_sizes, rows_per_token: int,
                 topk_weights: torch.Tensor | None = None) -> None:
    """out [P_valid, N] = a[pair // rows_per_token] @ w[expert].T for every pair (routing weights applied
    when given)."""
    sorted_pair_ids, block_expert_ids, num_padded = aligned
    block_m, block_n, block_k = block_sizes
    n, k = w.shape[1], w.shape[2]
    grid = (block_expert_ids.numel() * triton.cdiv(n, block_n),)
    grouped_gemm_kernel[grid](
        a, w, out, topk_weights if topk_weights is not None else out,
        sorted_pair_ids, block_expert_ids, num_padded,
        n, out.shape[0],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        K=k,
        A_ROWS_PER_TOKEN=rows_per_token, MUL_ROUTED_WEIGHT=topk_weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> [T, H]: what layers.moe.experts_torch computes, in two grouped GEMMs."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    intermediate = w2.shape[2]
    if num_tokens == 0:
        return torch.zeros_like(x)
    block_sizes = _block_sizes(num_pairs, 2 * intermediate)
    aligned = align_by_expert(topk_ids, w13.shape[0], block_sizes[0])
    gate_up = torch.empty(num_pairs, 2 * intermediate, dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, gate_up, aligned, block_sizes, rows_per_token=top_k)
    activated = _silu_and_mul(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    grouped_gemm(activated, w2, down, aligned, _block_sizes(num_pairs, hidden), rows_per_token=1,
                 topk_weights=topk_weights.flatten().contiguous())
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
