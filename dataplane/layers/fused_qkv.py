"""One Triton kernel from the QKV projection's output to attention's input: q/k norm, rotary, KV store.

Per token it reads the fused qkv row once, applies the optional per-head RMSNorm of q and
k (Qwen3), rotates q and k (rotate-half RoPE), writes q for attention and stores k and v
into the paged KV cache at slot_mapping (slot -1, a padding token, stores nothing),
quantized for an FP8 cache as kv_fp8.quantize_kv does. It replaces four launches of the
unfused path (q norm, k norm, rotary in fused_ops.py, the store in
attention/triton_store_kv.py) and rounds where they round, so the two paths agree to the
last bit or nearly. layers/attention.py calls it on CUDA; the layers' torch code stays the
CPU path and the reference (tests/dataplane/test_fused_qkv.py). No host sync and shapes
from shapes alone: CUDA graphs capture it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.attention.triton_store_kv import check_kv_cache
from dataplane.kv_fp8 import FP8_KV_DTYPE, FP8_MAX


@triton.jit
def _norm_rope_heads(x_ptr, norm_weight_ptr, eps, cos, sin,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Heads [NUM_HEADS, HEAD_DIM] at x_ptr -> their rotated halves in x's dtype, and where they lie."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM // 2)
    first = heads * HEAD_DIM + dims  # rotate-half: dims [0, d/2) pair with [d/2, d)
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + first + HEAD_DIM // 2, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / HEAD_DIM
        inv_rms = tl.rsqrt(variance + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + dims, mask=dims < HEAD_DIM // 2, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + HEAD_DIM // 2 + dims, mask=dims < HEAD_DIM // 2, other=0.0).to(tl.float32)
        # rounded to x's dtype before and after the weight multiplies, as RMSNorm's torch code does
        x1f = ((x1f * inv_rms).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        x2f = ((x2f * inv_rms).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    out1 = (x1f * cos - x2f * sin).to(x1.dtype)
    out2 = (x2f * cos + x1f * sin).to(x1.dtype)
    return out1, out2, first, mask


@triton.jit
def _to_cache(x, cache_ptr, inv_scale, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr):
    if QUANTIZE:  # kv_fp8.quantize_kv: x / scale in fp32, saturated, then cast
        x = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def norm_rope_store_kernel(
    qkv_ptr, qkv_stride_t, positions_ptr, cos_sin_ptr, cos_sin_stride,
    q_norm_weight_ptr, k_norm_weight_ptr, eps,
    q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_inv_scale, v_inv_scale,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr,
    QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    # a cache row is [cos(d/2) | sin(d/2)] in fp32
    row = cos_sin_ptr + position * cos_sin_stride + half
    cos = tl.load(row, mask=half < HEAD_DIM // 2, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HEAD_DIM // 2, mask=half < HEAD_DIM // 2, other=0.0).to(tl.float32)[None, :]
    q_in = qkv_ptr + token * qkv_stride_t
    k_in = q_in + NUM_Q_HEADS * HEAD_DIM
    v_in = k_in + NUM_KV_HEADS * HEAD_DIM

    q1, q2, q_first, q_mask = _norm_rope_heads(q_in, q_norm_weight_ptr, eps, cos, sin, NUM_Q_HEADS, HEAD_DIM,
                                               HAS_NORM, BLOCK_HQ, BLOCK_HALF)
    q_out = q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM)
    tl.store(q_out + q_first, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_out + q_first + HEAD_DIM // 2, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    # a slot is NUM_KV_HEADS * HEAD_DIM contiguous elements (check_kv_cache); slot -1 stores nothing
    k1, k2, k_first, k_mask = _norm_rope_heads(k_in, k_norm_weight_ptr, eps, cos, sin, NUM_KV_HEADS, HEAD_DIM,
                                               HAS_NORM, BLOCK_HK, BLOCK_HALF)
    k_mask = k_mask & (slot >= 0)
    k_out = k_cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM)
    tl.store(k_out + k_first, _to_cache(k1, k_cache_ptr, k_inv_scale, QUANTIZE, FP8_MAX), mask=k_mask)
    tl.store(k_out + k_first + HEAD_DIM // 2, _to_cache(k2, k_cache_ptr, k_inv_scale, QUANTIZE, FP8_MAX),
             mask=k_mask)

    heads = tl.arange(0, BLOCK_HK)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    v_offsets = heads * HEAD_DIM + dims
    v_mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & (slot >= 0)
    v = tl.load(v_in + v_offsets, mask=v_mask, other=0.0)
    tl.store(v_cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + v_offsets,
             _to_cache(v, v_cache_ptr, v_inv_scale, QUANTIZE, FP8_MAX), mask=v_mask)


def norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                    num_heads: int, num_kv_heads: int, head_dim: int,
                    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                    eps: float = 0.0, k_scale: float = 1.0, v_scale: float = 1.0,
                    q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (num_heads + 2 * num_kv_heads) * head_dim] -> q [T, num_heads * head_dim], normed (when the
    norm weights are given) and rotated; k (normed, rotated) and v go to the cache slots of slot_mapping."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    assert qkv.dim() == 2 and qkv.shape[1] == q_size + 2 * kv_size and qkv.stride(1) == 1, \
        f"qkv must be [T, {q_size + 2 * kv_size}] with contiguous rows, got {tuple(qkv.shape)} {qkv.stride()}"
    assert head_dim % 2 == 0, f"rotary needs an even head_dim, got {head_dim}"
    assert positions.shape == (num_tokens,) and slot_mapping.shape == (num_tokens,), \
        f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1, \
        f"cos_sin_cache must be [max_position, {head_dim}] with contiguous rows, got {tuple(cos_sin_cache.shape)}"
    check_kv_cache(k_cache, v_cache)
    assert tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim), \
        f"the cache holds {tuple(k_cache.shape[2:])} (kv heads, head dim) per slot, not {(num_kv_heads, head_dim)}"
    assert k_cache.dtype in (qkv.dtype, FP8_KV_DTYPE), f"qkv is {qkv.dtype} but the cache {k_cache.dtype}"
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None), "q and k are normed together or not at all"
    for weight in (q_norm_weight, k_norm_weight) if has_norm else ():
        assert weight.shape == (head_dim,) and weight.is_contiguous() and weight.dtype == qkv.dtype, \
            f"norm weights must be contiguous [{head_dim}] in {qkv.dtype}"
    assert qkv.device == positions.device == cos_sin_cache.device == k_cache.device == slot_mapping.device, \
        "qkv, positions, cos_sin_cache, the cache and slot_mapping must share a device"
    if q_out is None:
        q_out = torch.empty(num_tokens, q_size, dtype=qkv.dtype, device=qkv.device)
    assert q_out.shape == (num_tokens, q_size) and q_out.is_contiguous(), f"q_out must be contiguous [T, {q_size}]"
    if num_tokens == 0:
        return q_out
    norm_rope_store_kernel[(num_tokens,)](
        qkv, qkv.stride(0), positions, cos_sin_cache, cos_sin_cache.stride(0),
        q_norm_weight if has_norm else qkv, k_norm_weight if has_norm else qkv, eps,
        q_out, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HAS_NORM=has_norm,
        QUANTIZE=k_cache.dtype == FP8_KV_DTYPE, FP8_MAX=FP8_MAX,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return q_out
