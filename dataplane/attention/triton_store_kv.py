"""Triton kernel that writes the new keys and values of a step into the paged KV cache.

Token t's K/V rows (`[num_kv_heads, head_dim]`) go to cache slot `slot_mapping[t]` of
`k_cache`/`v_cache` (`[num_blocks, block_size, num_kv_heads, head_dim]`, seen as one
flat array of slots); slot -1 marks a padding token, which is skipped. One program per
token. Called by the "triton" backend (triton_backend.py) before the attention kernels
(triton_decode.py, triton_prefill.py) read the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_kvcache_kernel(
    key_ptr, key_stride_t, key_stride_h,
    value_ptr, value_stride_t, value_stride_h,
    k_cache_ptr, v_cache_ptr,
    slot_mapping_ptr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token (CUDA-graph batch padding): nothing to store
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    key = tl.load(key_ptr + token.to(tl.int64) * key_stride_t + heads * key_stride_h + dims, mask=mask)
    value = tl.load(value_ptr + token.to(tl.int64) * value_stride_t + heads * value_stride_h + dims, mask=mask)
    # a slot is NUM_KV_HEADS * HEAD_DIM contiguous elements (asserted by the wrapper)
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(k_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, value, mask=mask)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The kernels address the cache as flat slots of num_kv_heads * head_dim contiguous elements."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        "k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
        f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    assert k_cache.dtype == v_cache.dtype, f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}"
    for cache in (k_cache, v_cache):
        _, block_size, num_kv_heads, head_dim = cache.shape
        assert cache.stride(3) == 1 and cache.stride(2) == head_dim and cache.stride(1) == num_kv_heads * head_dim \
            and cache.stride(0) == block_size * num_kv_heads * head_dim, \
            f"each layer's KV cache must be contiguous, got strides {cache.stride()}"


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor):
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ"
    check_kv_cache(k_cache, v_cache)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), \
        f"new K/V have {num_kv_heads} heads of {head_dim} but the cache holds {tuple(k_cache.shape[2:])}"
    assert key.dtype == value.dtype == k_cache.dtype, \
        f"K/V are {key.dtype}/{value.dtype} but the cache is {k_cache.dtype}: cast them before storing"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "K/V must have a contiguous last dimension"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64), \
        f"slot_mapping must be int [{num_tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
    assert key.device == k_cache.device == slot_mapping.device, "key, cache and slot_mapping must share a device"
    if num_tokens == 0:
        return
    store_kvcache_kernel[(num_tokens,)](
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        k_cache, v_cache, slot_mapping,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
