"""Rotary position embedding (rotate-half layout, as in HF Llama/Qwen) with a cos/sin cache.

Supports plain RoPE and the "llama3" frequency scaling of Llama 3.1+; any other scaling
type is refused with an error rather than silently ignored. On CUDA, q and k are rotated
by one Triton kernel (fused_ops.py); the torch code is the CPU path and the reference.
"""
from __future__ import annotations

import math

import torch
from torch import nn

try:
    from dataplane.layers import fused_ops
except ModuleNotFoundError as e:  # no Triton: the torch code is the only path
    if e.name != "triton":
        raise
    fused_ops = None

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_type_of(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are stretched by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None):
        super().__init__()
        if rotary_dim != head_size:
            raise ValueError(f"partial rotary embedding (rotary_dim {rotary_dim} < head_size {head_size}) is not supported")
        self.head_size = head_size
        inv_freq = compute_inv_freq(rotary_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        # fp32 on purpose: the model's dtype must not round the angles (see the loader's dtype handling)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """query [T, num_heads * head_size], key [T, num_kv_heads * head_size] -> both rotated."""
        if fused_ops is not None and fused_ops.enabled_for(query):
            return fused_ops.apply_rotary(positions, query, key, self.cos_sin_cache, self.head_size)
        cos, sin = self.cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
        q_shape, k_shape = query.shape, key.shape
        query = apply_rotary_emb(query.view(q_shape[0], -1, self.head_size), cos, sin).view(q_shape)
        key = apply_rotary_emb(key.view(k_shape[0], -1, self.head_size), cos, sin).view(k_shape)
        return query, key
