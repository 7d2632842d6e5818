"""Triton kernels for the small per-token ops of a decoder layer, one launch each.

RMSNorm (alone, fused with the residual add, or per head for Qwen3's q/k norm), rotary
embedding of q and k together, and SiLU-and-mul. Each computes in fp32 and rounds where
the torch code in layernorm.py, rotary.py and activation.py rounds, so the two paths
agree to the last bit or nearly; those layers call these wrappers for CUDA tensors
(`enabled_for`) and keep their torch code as the CPU path and the reference
(tests/dataplane/test_fused_ops.py). Outputs are fresh contiguous tensors (or `out=`),
shapes depend on shapes alone and nothing syncs with the host: CUDA graphs capture them.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

DISABLE_ENV = "NANOPLANE_DISABLE_FUSED_OPS"


def enabled_for(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get(DISABLE_ENV, "") in ("", "0")


@triton.jit
def rms_norm_kernel(
    x_ptr, x_stride_t, x_stride_h,
    residual_ptr, residual_stride_t, residual_stride_h,
    weight_ptr, out_ptr, residual_out_ptr,
    num_rows, num_heads, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # row r of [T, num_heads, N] is token r // num_heads, head r % num_heads (num_heads = 1 for [T, N])
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    tokens = (rows // num_heads).to(tl.int64)
    heads = (rows % num_heads).to(tl.int64)
    x = tl.load(x_ptr + (tokens * x_stride_t + heads * x_stride_h)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + (tokens * residual_stride_t + heads * residual_stride_h)[:, None]
                           + cols[None, :], mask=mask, other=0.0)
        h += residual.to(tl.float32)
        tl.store(residual_out_ptr + out_offsets, h.to(residual_out_ptr.dtype.element_ty), mask=mask)
    variance = tl.sum(h * h, axis=1) / N
    # rounded to the input dtype before the weight multiplies it, as the torch code (and HF) does
    normed = (h * tl.rsqrt(variance + eps)[:, None]).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, (normed * weight[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [T, H, N] with a contiguous last dimension, a view where possible."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-1]).unsqueeze(1)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor | None):
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous(), \
        f"weight must be contiguous [{n}], got {tuple(weight.shape)}"
    assert weight.device == x.device, f"x is on {x.device} but weight on {weight.device}"
    for t in (out, residual_out):
        assert t is None or (t.shape == x.shape and t.is_contiguous()), "outputs must be contiguous, shaped like x"
    x3 = _rows(x)
    r3 = _rows(residual) if residual is not None else x3
    num_tokens, num_heads, _ = x3.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return
    block_n = triton.next_power_of_2(n)
    rows_per_program = max(1, min(16, 1024 // block_n))  # small rows (per-head norms) share a program
    rms_norm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x3, x3.stride(0), x3.stride(1),
        r3, r3.stride(0), r3.stride(1),
        weight, out, residual_out if residual_out is not None else out,
        num_rows, num_heads, eps,
        N=n, HAS_RESIDUAL=residual is not None, ROWS=rows_per_program, BLOCK_N=block_n,
        num_warps=min(16, max(1, rows_per_program * block_n // 256)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of x ([..., N]; [T, heads, N] for a per-head norm, any strides)."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch_rms_norm(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """(norm(x + residual), x + residual): the sum taken in fp32 and kept in x's dtype."""
    assert residual.shape == x.shape, f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ"
    assert residual.device == x.device, f"x is on {x.device} but residual on {residual.device}"
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


@triton.jit
def _rotate_heads(x_ptr, out_ptr, cos, sin,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM // 2)
    first = heads * HEAD_DIM + dims  # rotate-half: dims [0, d/2) pair with [d/2, d)
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + first + HEAD_DIM // 2, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(out_ptr + first, (x1f * cos - x2f * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first + HEAD_DIM // 2, (x2f * cos + x1f * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(
    positions_ptr, cos_sin_ptr, cos_sin_stride,
    q_ptr, q_stride_t, k_ptr, k_stride_t, q_out_ptr, k_out_ptr,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    # a cache row is [cos(d/2) | sin(d/2)] in fp32
    row = cos_sin_ptr + position * cos_sin_stride + dims
    cos = tl.load(row, mask=dims < HEAD_DIM // 2, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HEAD_DIM // 2, mask=dims < HEAD_DIM // 2, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * q_stride_t, q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM), cos, sin,
                  NUM_Q_HEADS, HEAD_DIM, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * k_stride_t, k_out_ptr + token * (NUM_K_HEADS * HEAD_DIM), cos, sin,
                  NUM_K_HEADS, HEAD_DIM, BLOCK_HK, BLOCK_HALF)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [T, heads * head_dim] whose heads lie contiguously in each row (a view where possible)."""
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 head_dim: int, q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """Rotate-half RoPE of q [T, Hq * d] and k [T, Hk * d] (or [T, H, d]) at positions [T] -> new (q, k)."""
    num_tokens = q.shape[0]
    q2, k2 = _token_rows(q), _token_rows(k)
    assert q2.shape[1] % head_dim == 0 and k2.shape[1] % head_dim == 0 and head_dim % 2 == 0, \
        f"q {tuple(q.shape)} and k {tuple(k.shape)} are not whole heads of {head_dim}"
    assert k.shape[0] == num_tokens and positions.shape == (num_tokens,), \
        f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree on the token count"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1, \
        f"cos_sin_cache must be [max_position, {head_dim}] with contiguous rows, got {tuple(cos_sin_cache.shape)}"
    assert q.device == k.device == positions.device == cos_sin_cache.device, "q, k, positions and cache share a device"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous() and k_out.is_contiguous(), \
        "q_out/k_out must be contiguous, shaped like q/k"
    if num_tokens == 0:
        return q_out, k_out
    num_q_heads, num_k_heads = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    rotary_kernel[(num_tokens,)](
        positions, cos_sin_cache, cos_sin_cache.stride(0),
        q2, q2.stride(0), k2, k2.stride(0), q_out, k_out,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )
    return q_out, k_out


@triton.jit
def silu_and_mul_kernel(x_ptr, x_stride_t, out_ptr, D: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + token * x_stride_t + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + token * x_stride_t + D + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu rounds to the input dtype before the multiply, as F.silu(gate) * up does
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + token * D + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2 * D] = [gate | up] -> silu(gate) * up, [..., D]."""
    d = x.shape[-1] // 2
    assert x.shape[-1] == 2 * d, f"the last dimension of x must be even, got {tuple(x.shape)}"
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    assert out.shape == (*x.shape[:-1], d) and out.is_contiguous(), f"out must be contiguous [..., {d}]"
    if x2.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, x2.stride(0), out, D=d, BLOCK=block,
                                                                 num_warps=4)
    return out
