"""The KV cache tensor: its size for a memory budget, its allocation, and binding it to the layers.

One tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (docs/design.md,
"Memory"); each Attention module gets views of its layer's K and V. Under tensor
parallelism a rank holds only its own kv heads (one replicated head when the model has
fewer KV heads than ranks).
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.distributed import get_tp_size, local_num_kv_heads
from dataplane.layers.attention import Attention
from dataplane.model_config import ModelConfig


def rank_num_kv_heads(config: ModelConfig) -> int:
    return local_num_kv_heads(config.num_key_value_heads, get_tp_size())


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on one rank."""
    per_head = config.kv_bytes_per_token(dtype) // config.num_key_value_heads
    return per_head * rank_num_kv_heads(config) * block_size


def num_blocks_for_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype, nbytes: int) -> int:
    """How many whole blocks fit in nbytes of this rank's memory."""
    return max(0, nbytes // bytes_per_block(config, block_size, dtype))


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    # zeros, not empty: the torch reference multiplies masked-out (never written) slots by 0, and NaN * 0 is NaN
    return torch.zeros(config.num_hidden_layers, 2, num_blocks, block_size, rank_num_kv_heads(config),
                       config.head_dim, dtype=dtype, device=device)


def bind_kv_cache(model: nn.Module, kv_cache: torch.Tensor) -> None:
    """Gives the i-th Attention module of the model (in module order) the views kv_cache[i, 0] and kv_cache[i, 1]."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if len(layers) != kv_cache.shape[0]:
        raise ValueError(f"KV cache has {kv_cache.shape[0]} layers, the model {len(layers)} attention layers")
    for i, attn in enumerate(layers):
        if tuple(kv_cache.shape[-2:]) != (attn.num_kv_heads, attn.head_dim):
            raise ValueError(f"KV cache holds {tuple(kv_cache.shape[-2:])} (kv heads, head dim) per token, "
                             f"layer {i} needs {(attn.num_kv_heads, attn.head_dim)}")
        attn.k_cache = kv_cache[i, 0]
        attn.v_cache = kv_cache[i, 1]
