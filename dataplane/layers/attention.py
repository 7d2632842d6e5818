"""The attention layer of every decoder layer: writes new K/V into the paged cache, then attends.

The runner binds each layer's `k_cache`/`v_cache` (views into the KV cache tensor, see
dataplane/kv_cache.py) and sets the AttentionMetadata (dataplane/context.py) around each
forward. Which backend computes the attention is one process-wide choice. On CUDA,
`forward_qkv` takes the QKV projection's output whole: one kernel (fused_qkv.py) norms and
rotates q and k and stores K/V, in the cache layout every backend reads (context.py), and
the backend only attends; `forward` (q, k, v already rotated) is the unfused path.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.attention import AttentionBackend, get_attention_backend
from dataplane.context import AttentionMetadata, get_context
from dataplane.kv_fp8 import FP8_KV_DTYPE, quantize_kv
from dataplane.layers.layernorm import RMSNorm
from dataplane.layers.rotary import RotaryEmbedding

try:
    from dataplane.layers import fused_ops, fused_qkv
except ModuleNotFoundError as e:  # no Triton: the unfused torch path is the only one
    if e.name != "triton":
        raise
    fused_ops = fused_qkv = None

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
        self.fuse_qkv = True  # kv_fp8's calibration turns it off to see k and v in forward

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads * head_dim], k and v [T, num_kv_heads * head_dim] -> [T, num_heads * head_dim]."""
        meta = self._context()
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache.dtype == FP8_KV_DTYPE:
            # stored as bytes: every backend's store copies them, and index_copy_ has no float8 kernel on CPU
            _backend.store_kv(quantize_kv(k, self.k_scale).view(torch.uint8),
                              quantize_kv(v, self.v_scale).view(torch.uint8),
                              self.k_cache.view(torch.uint8), self.v_cache.view(torch.uint8), meta.slot_mapping)
        else:
            _backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self._attend(q, meta)

    def fuses_qkv(self, qkv: torch.Tensor) -> bool:
        """Whether forward_qkv may run: CUDA with the fused ops on, and not while kv_fp8's calibration
        watches forward's k and v."""
        return self.fuse_qkv and fused_qkv is not None and fused_ops.enabled_for(qkv)

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                    q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> torch.Tensor:
        """qkv [T, (num_heads + 2 * num_kv_heads) * head_dim], unrotated -> [T, num_heads * head_dim]: the
        unfused path's q/k norms, rotary and store in one kernel, then the backend's attention."""
        meta = self._context()
        q = fused_qkv.norm_rope_store(
            qkv, positions, rotary.cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            q_norm_weight=q_norm.weight if q_norm is not None else None,
            k_norm_weight=k_norm.weight if k_norm is not None else None,
            eps=q_norm.eps if q_norm is not None else 0.0, k_scale=self.k_scale, v_scale=self.v_scale)
        return self._attend(q, meta)

    def _context(self) -> AttentionMetadata:
        if self.k_cache.numel() == 0:
            raise RuntimeError("attention run before a KV cache was bound (dataplane.kv_cache.bind_kv_cache)")
        return get_context()

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, num_heads * head_dim] over the cache, new K/V already stored -> [T, num_heads * head_dim]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        if self.k_cache.dtype == FP8_KV_DTYPE:
            out = _backend.forward(q, self.k_cache, self.v_cache, meta, self.scale * self.k_scale) * self.v_scale
        else:
            out = _backend.forward(q, self.k_cache, self.v_cache, meta, self.scale)
        return out.view(-1, self.num_heads * self.head_dim)
