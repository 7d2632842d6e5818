"""The attention layer of every decoder layer: writes new K/V into the paged cache, then attends.

The runner binds each layer's `k_cache`/`v_cache` (views into the KV cache tensor, see
dataplane/kv_cache.py) and sets the AttentionMetadata (dataplane/context.py) around each
forward. Which backend computes the attention is one process-wide choice.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.attention import AttentionBackend, get_attention_backend
from dataplane.context import get_context
from dataplane.kv_fp8 import FP8_KV_DTYPE, quantize_kv

_backend: AttentionBackend = get_attention_backend("torch")


def set_attention_backend(name: str) -> AttentionBackend:
    global _backend
    _backend = get_attention_backend(name)
    return _backend


def get_selected_backend() -> AttentionBackend:
    return _backend


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])
        # an FP8 cache holds k / k_scale and v / v_scale (dataplane/kv_fp8.py sets them)
        self.k_scale = self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads * head_dim], k and v [T, num_kv_heads * head_dim] -> [T, num_heads * head_dim]."""
        if self.k_cache.numel() == 0:
            raise RuntimeError("attention run before a KV cache was bound (dataplane.kv_cache.bind_kv_cache)")
        meta = get_context()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache.dtype == FP8_KV_DTYPE:
            # stored as bytes: every backend's store copies them, and index_copy_ has no float8 kernel on CPU
            _backend.store_kv(quantize_kv(k, self.k_scale).view(torch.uint8),
                              quantize_kv(v, self.v_scale).view(torch.uint8),
                              self.k_cache.view(torch.uint8), self.v_cache.view(torch.uint8), meta.slot_mapping)
            out = _backend.forward(q, self.k_cache, self.v_cache, meta, self.scale * self.k_scale) * self.v_scale
        else:
            _backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            out = _backend.forward(q, self.k_cache, self.v_cache, meta, self.scale)
        return out.view(-1, self.num_heads * self.head_dim)
