"""Which weight quantization a data plane serves with, and reading FP8 checkpoints.

`--quantization`: auto (what the checkpoint is: FP8 for an FP8 checkpoint, else none), none
(weights in --dtype; an FP8 checkpoint is dequantised at load), fp8 (FP8 weights, quantised at
load per channel when the checkpoint is not FP8 already; layers/fp8.py).

FP8 checkpoints on the hub come in two formats, both read here:
- `quantization_config.quant_method == "fp8"` (Qwen3 FP8, DeepSeek): float8_e4m3fn weights with a
  float32 `weight_scale_inv` per 128 x 128 block (`weight_block_size`);
- compressed-tensors float-quantized 8-bit (Neural Magic / Red Hat): float8 weights with a
  `weight_scale` per output channel or per tensor (static `input_scale`s are dropped: activations
  are scaled per token at run time).
`dequantized_tensors` turns their stream of checkpoint tensors into plain weights (whole tensors,
before the tensor-parallel weight loaders slice them); quantize_linear_layers then requantises the
linear layers per channel. A block-scaled GEMM that keeps the 128 x 128 scales is not written yet.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from dataplane.config import QUANTIZATION_CHOICES
SUPPORTED_CHECKPOINT_FORMATS = ("fp8 (128x128 block scales)", "compressed-tensors float 8-bit")
_FP8_DTYPES = (torch.float8_e4m3fn,)


def checkpoint_quantization(quantization_config: dict | None) -> str | None:
    """The checkpoint's quantization: None (unquantised), "fp8-block" or "fp8-channel"; a ValueError naming the
    supported formats for anything else."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        if quantization_config.get("fmt", "e4m3") != "e4m3" or (block is not None and len(block) != 2):
            raise ValueError(f"unsupported fp8 checkpoint quantization_config {quantization_config}; supported: "
                             "fmt e4m3 with 2-D weight_block_size or per-tensor scales")
        return "fp8-block"
    if method == "compressed-tensors":
        groups = quantization_config.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
            return "fp8-channel"
    raise ValueError(f"unsupported checkpoint quantization {method!r}; supported: "
                     f"{', '.join(SUPPORTED_CHECKPOINT_FORMATS)} (or an unquantised checkpoint)")


def resolve_quantization(flag: str, quantization_config: dict | None) -> str:
    """--quantization and the checkpoint -> "none" or "fp8" (how the linear layers compute)."""
    if flag not in QUANTIZATION_CHOICES:
        raise ValueError(f"unsupported --quantization {flag!r}; supported: {', '.join(QUANTIZATION_CHOICES)}")
    from_checkpoint = checkpoint_quantization(quantization_config)
    if flag == "auto":
        return "fp8" if from_checkpoint else "none"
    return flag


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 weight [N, K] and its scale (per tensor [] or [1], per channel [N] or [N, 1], or per block
    [ceil(N / bn), ceil(K / bk)]) -> weight in dtype."""
    w = weight.float()
    scale = scale.float()
    if scale.numel() == 1:
        return (w * scale.reshape(())).to(dtype)
    if scale.numel() == w.shape[0] and (scale.dim() == 1 or scale.shape[-1] == 1):
        return (w * scale.reshape(-1, 1)).to(dtype)
    if scale.dim() != 2 or w.dim() != 2:
        raise ValueError(f"cannot apply a scale of shape {tuple(scale.shape)} to a weight of {tuple(w.shape)}")
    block_n, block_k = -(-w.shape[0] // scale.shape[0]), -(-w.shape[1] // scale.shape[1])
    expanded = scale.repeat_interleave(block_n, 0)[:w.shape[0]].repeat_interleave(block_k, 1)[:, :w.shape[1]]
    return (w * expanded).to(dtype)


def dequantized_tensors(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pairs each float8 `X.weight` with its `X.weight_scale_inv` / `X.weight_scale` (in either order, any
    shard) and yields the dequantised `X.weight`; drops `X.input_scale`; passes everything else through."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(".input_scale"):
            continue
        if name.endswith((".weight_scale_inv", ".weight_scale")):
            weight_name = name[:name.rindex(".weight_scale")] + ".weight"
            if weight_name in weights:
                yield weight_name, dequantize_fp8(weights.pop(weight_name), tensor, dtype)
            else:
                scales[weight_name] = tensor
        elif name.endswith(".weight") and tensor.dtype in _FP8_DTYPES:
            if name in scales:
                yield name, dequantize_fp8(tensor, scales.pop(name), dtype)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        lonely = [f"{n} (no scale)" for n in weights] + [f"the scale of {n} (no weight)" for n in scales]
        raise ValueError(f"FP8 checkpoint tensors without their partner: {', '.join(lonely[:10])}")
