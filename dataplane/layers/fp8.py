"""FP8 (e4m3) weights: per-channel quantisation at load, dynamic per-token activations, scaled GEMMs.

A quantised linear layer holds its weight as float8_e4m3fn [N, K] and one float32 scale per
output channel (`weight_scale` [N, 1]: the row's largest magnitude / 448). Each forward
quantises the activations per token the same way and multiplies through `torch._scaled_mm`
with both scale vectors, accumulating in fp32 and writing the model's dtype: Hopper's FP8
tensor cores on a GPU; on CPU torch computes the same product (slowly), so CPU tests run the
very code path the GPU runs. The router of an MoE layer, the embeddings, the LM head and the
experts stay in the model's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token: any scale gives zeros, but not a division by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M, 1]) with x ~ q.float() * scale, one scale per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=_MIN_SCALE)
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] in bf16/fp32 -> [..., N] in x's dtype; weight float8 [N, K], weight_scale [N, 1]."""
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=x.dtype,
                           bias=bias)
    return out.view(*shape[:-1], weight.shape[0])


def can_quantize(module: nn.Module) -> bool:
    # the scaled GEMM needs both dimensions a multiple of 16 (cuBLASLt's FP8 rule)
    weight = module.weight
    return weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def quantize_linear_layers(model: nn.Module) -> int:
    """Quantises the weights of the model's tensor-parallel linear layers in place (after loading);
    -> how many. Each rank quantises its own shard."""
    from dataplane.layers.linear import LinearBase, ReplicatedLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear) and can_quantize(module):
            q, scale = quantize_rows(module.weight.data)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.register_buffer("weight_scale", scale, persistent=False)
            count += 1
    return count


def fp8_supported(device: torch.device) -> str | None:
    """None if FP8 GEMMs run on device, else a sentence saying why not."""
    if device.type == "cpu":
        return None  # torch computes them (slowly): the CPU tests' path
    if device.type != "cuda":
        return f"FP8 needs a CUDA GPU or the CPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None
