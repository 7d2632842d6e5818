"""Triton GEMM y = x @ W^T (+ bias) for decode-sized M, streaming W at close to the memory bound.

x is [M, K] (M from 1 to a few hundred), W the nn.Linear weight [N, K] as stored, accumulation in
fp32, output in x's dtype. At such M the GEMM reads W once and does little else, so the kernel's
job is to keep every SM streaming W: small masked BLOCK_M, wide BLOCK_K, and split-K where the
N tiles alone are too few to fill the SMs. Split-K writes fp32 partials and a second small kernel
sums them (no atomics, so the result does not depend on the order programs finish).

The config comes from `pick_config(M, N, K, num_sms)`, a pure function of shapes: no tuning at
serve time, no host sync, so CUDA graphs capture it. linear.py dispatches here (`use_for`); its
F.linear stays the CPU path and the reference (tests/dataplane/test_skinny_gemm.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dataplane.layers.fused_ops import enabled_for

# Largest M sent here (0: none, every matmul stays with cuBLAS). Measured with benchmarks/gemm_shapes.py on an
# H100 (docs/benchmarks.md): at Qwen3-0.6B's shapes cuBLAS is as fast or faster at every M, and at Llama-3-8B's
# this kernel wins by at most 5% up to M 16; so off by default. The environment variable sets it, to measure
# the kernel on another GPU.
MAX_M_ENV = "NANOPLANE_SKINNY_GEMM_MAX_M"
MAX_M = int(os.environ.get(MAX_M_ENV, "0"))
DTYPES = (torch.bfloat16, torch.float16)
MIN_SLICE_STEPS = 2  # shorter K slices spend more on fp32 partials than they gain in parallelism


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


def pick_config(m: int, n: int, k: int, num_sms: int) -> GemmConfig:
    """Tiles for one (M, N, K): narrower N tiles, then split-K, until the programs fill the SMs
    (at most about twice over), each K slice at least MIN_SLICE_STEPS BLOCK_K steps long."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_k = 256 if block_m <= 16 else 128
    block_n = 64
    m_tiles = triton.cdiv(m, block_m)
    if triton.cdiv(n, block_n) * m_tiles < num_sms:
        block_n = 32
    tiles = triton.cdiv(n, block_n) * m_tiles
    split_k = 1
    while tiles * split_k * 2 <= 2 * num_sms and triton.cdiv(k, block_k * split_k * 2) >= MIN_SLICE_STEPS:
        split_k *= 2
    return GemmConfig(block_m, block_n, block_k, split_k)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear.py sends this matmul here: CUDA, half-precision weights, decode-sized M."""
    # MAX_M first: at 0 (the default) every matmul leaves at once, without reading the environment
    return (MAX_M > 0 and x.numel() <= MAX_M * x.shape[-1] and enabled_for(x) and weight.dtype in DTYPES
            and x.dtype == weight.dtype and weight.stride(-1) == 1)


@triton.jit
def skinny_gemm_kernel(
    x_ptr, stride_xm, w_ptr, stride_wn, bias_ptr, out_ptr, partial_ptr,
    M, N, K,
    K_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the M tiles of one W tile run together, so W comes from DRAM once
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * K_PER_SPLIT
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_start + rk)[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + (k_start + rk)[:, None]  # W^T tile [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k_start + k + rk) < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = m_mask[:, None] & n_mask[None, :]
    offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + offsets, acc, mask=mask)


@triton.jit
def split_k_sum_kernel(partial_ptr, bias_ptr, out_ptr, M, N,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: the sum is the same on every run
        acc += tl.load(partial_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemmConfig | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N] in x's dtype, fp32 accumulation."""
    n, k = weight.shape
    assert x.shape[-1] == k, f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
    assert weight.stride(1) == 1, "weight rows must be contiguous"
    assert x.dtype == weight.dtype, f"x is {x.dtype} but weight {weight.dtype}"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), f"bias must be contiguous [{n}]"
    assert x.device == weight.device, f"x is on {x.device} but weight on {weight.device}"
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if config is None:
        config = pick_config(m, n, k, _num_sms(x.device.index or 0) if x.is_cuda else 132)
    k_per_split = triton.cdiv(triton.cdiv(k, config.block_k), config.split_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # a slice never starts past K
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
    skinny_gemm_kernel[grid](
        x2, x2.stride(0), weight, weight.stride(0), bias_arg, out, partial,
        m, n, k,
        K_PER_SPLIT=k_per_split, HAS_BIAS=bias is not None, SPLIT_K=split_k, EVEN_K=k % k_per_split == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        split_k_sum_kernel[(m, triton.cdiv(n, block))](partial, bias_arg, out, m, n, HAS_BIAS=bias is not None,
                                                       SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out
