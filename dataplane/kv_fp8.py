"""The FP8 KV cache (`--kv-cache-dtype fp8`): e4m3 keys and values with one scale per layer and tensor.

A layer stores k / k_scale and v / v_scale as float8_e4m3fn (half the bytes of bf16, so decode,
which reads the whole context every step, reads half as much). The scales are folded around the
attention backends, which need no scale arguments: the scores use softmax scale * k_scale, and
the output is multiplied by v_scale (layers/attention.py). The kernels upcast each K/V tile they
load to the query's dtype; the torch reference reads the cache as float32 anyway.

The scales come from a calibration forward at start-up (`calibrate_kv_scales`): one prefill of
CALIBRATION_TOKENS pseudo-random token ids, whose largest |k| and |v| per layer, times
SCALE_HEADROOM, map to e4m3's largest value, 448. The headroom leaves room for text whose
keys run larger than the calibration's; what it costs is at the small end, where values below
about 1e-4 of the largest become subnormal or zero and hardly move a dot product.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.config import KV_CACHE_DTYPE_CHOICES
from dataplane.context import AttentionMetadata, forward_context

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max
CALIBRATION_TOKENS = 512
SCALE_HEADROOM = 4.0


def kv_cache_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    if choice not in KV_CACHE_DTYPE_CHOICES:
        raise ValueError(f"unsupported --kv-cache-dtype {choice!r}; supported: {', '.join(KV_CACHE_DTYPE_CHOICES)}")
    return FP8_KV_DTYPE if choice == "fp8" else model_dtype


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [T, H, D] -> float8 x / scale, saturated at +-448 (a cast past the range gives NaN on some devices)."""
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


@torch.inference_mode()
def calibrate_kv_scales(model: nn.Module, vocab_size: int, device: torch.device, dtype: torch.dtype,
                        seed: int = 0, num_tokens: int = CALIBRATION_TOKENS) -> list[tuple[float, float]]:
    """Runs one prefill against a scratch cache in dtype, sets each Attention layer's k_scale and v_scale,
    and returns them [(k_scale, v_scale) per layer]. Rebind the real KV cache afterwards."""
    from dataplane.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    amax = {id(layer): [0.0, 0.0] for layer in layers}

    def record(layer, args):
        _, k, v = args
        seen = amax[id(layer)]
        seen[0] = max(seen[0], float(k.abs().max()))
        seen[1] = max(seen[1], float(v.abs().max()))

    block_size = 16
    num_blocks = -(-num_tokens // block_size)
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    saved = [(layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale, layer.fuse_qkv) for layer in layers]
    try:
        for layer in layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.k_scale = layer.v_scale = 1.0
            layer.fuse_qkv = False  # the hook sees k and v only on the unfused path
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (num_tokens,), generator=generator).to(device)
        positions = torch.arange(num_tokens, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions.clone(),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
            max_query_len=num_tokens, max_seq_len=num_tokens,
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens])
        with forward_context(meta):
            model(ids, positions)
    finally:
        for handle in handles:
            handle.remove()
        for layer, (k_cache, v_cache, k_scale, v_scale, fuse_qkv) in zip(layers, saved):
            layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale = k_cache, v_cache, k_scale, v_scale
            layer.fuse_qkv = fuse_qkv
    scales = []
    for layer in layers:
        k_amax, v_amax = amax[id(layer)]
        layer.k_scale = max(k_amax, 1e-6) * SCALE_HEADROOM / FP8_MAX
        layer.v_scale = max(v_amax, 1e-6) * SCALE_HEADROOM / FP8_MAX
        scales.append((layer.k_scale, layer.v_scale))
    return scales
