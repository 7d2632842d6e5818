"""How the linear layers hold their weights on a CPU (`--cpu-weights`): fp32, bf16, packed int4 or int8.

A decode step on a CPU reads every weight once per step and multiplies it with a few rows. Measured on
a 2-core AVX2 host (docs/benchmarks.md, "CPU"), torch's packed int4 kernel
(`_weight_int4pack_mm_for_cpu`, group-wise asymmetric int4, group 32) is ~2x an fp32 GEMM on one
layer in isolation at one row, but end to end on SmolLM2-135M only ~10% faster at batch 1 and slower
at 16; bf16 weights are slower than fp32 without AVX512-BF16. So auto keeps fp32 for now.

int4: each group of 32 input features of a weight row gets a scale and a zero point; the kernel
computes w = (q - 8) * scale + zero with q in 0..15 (checked in tests/dataplane/test_cpu_weights.py).
A GGUF Q4_1 block (w = q * d + m, 32 weights, q = 0 at the block's minimum and 15 at its maximum) is
quantized here from its dequantized fp32 weights by the block's min and max, which gives back its
codes, so scale = d and zero = m + 8 d; Q4_0 (w = (q - 8) d) likewise. The kernel wants scales,
zeros and activations in bf16, so d and m (fp16 in the file) are rounded to bf16 and the activations
too: int4 is not bit-equal to fp32 (the agreement is measured in docs/benchmarks.md). fp32 stays the
oracle. The embeddings and, except under int8, the LM head (Q8_0 in the default model) keep the model's dtype.

int8: each output row gets one scale (symmetric, absmax / 127) and torch's `_weight_int8pack_mm`
multiplies bf16 activations with it (fp32 activations are ~5x slower there); the LM head gets an int8
copy too (the embedding keeps its fp32 rows). Not exact either: agreement in docs/benchmarks.md.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.config import CPU_WEIGHTS_CHOICES

INT4_GROUP_SIZE = 32
INT4_DTYPE = torch.uint8  # the packed weight: two 4-bit codes per byte, [N, K / 2]
INT8_DTYPE = torch.int8  # [N, K], one scale per row
_ACTIVATION_DTYPE = torch.bfloat16  # the only fast one: the kernel's fp32 path is scalar (~20x slower)


def resolve_cpu_weights(flag: str, device: torch.device) -> str:
    """--cpu-weights on this device -> "fp32" (the model's dtype, untouched), "bf16" or "int4"."""
    if flag not in CPU_WEIGHTS_CHOICES:
        raise ValueError(f"unsupported --cpu-weights {flag!r}; supported: {', '.join(CPU_WEIGHTS_CHOICES)}")
    if device.type != "cpu":
        return "fp32"  # the GPU keeps --dtype and its kernels
    if flag == "auto":
        return "fp32"  # int4 measured no faster end to end and not greedy-equal (docs/benchmarks.md, "CPU")
    return flag


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (K a multiple of group_size) -> (codes int32 [N, K] in 0..15, scale_and_zero fp32
    [K / group_size, N, 2]) with weight ~ (codes - 8) * scale + zero per group; min/max per group."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 weights need input features a multiple of {group_size}, got {k}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = ((groups - low) / safe).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale
    return codes, torch.cat([scale, zero], dim=-1).permute(1, 0, 2).contiguous()


def dequantize_int4(codes: torch.Tensor, scale_and_zero: torch.Tensor,
                    group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """The weight the kernel multiplies with (scales and zeros in their stored dtype) -> fp32 [N, K]."""
    scale = scale_and_zero[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zero = scale_and_zero[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (codes.float() - 8) * scale + zero


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype; packed uint8 [N, K / 2], scale_and_zero bf16 [K / 32, N, 2]."""
    shape = x.shape
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(_ACTIVATION_DTYPE), packed,
                                                     INT4_GROUP_SIZE, scale_and_zero).to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*shape[:-1], packed.shape[0])


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], fp32 scales [N]) with weight ~ codes * scale per row."""
    scale = weight.float().abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (weight.float() / safe[:, None]).round_().clamp_(-127, 127).to(INT8_DTYPE)
    return codes, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype; weight int8 [N, K], scale bf16 [N]."""
    shape = x.shape
    out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(_ACTIVATION_DTYPE), weight, scale).to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*shape[:-1], weight.shape[0])


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.nn.functional.linear(x.to(torch.bfloat16), weight).to(x.dtype)
    return out if bias is None else out + bias


def _hold_int8(module: nn.Module, weight: torch.Tensor) -> None:
    codes, scale = quantize_int8(weight)
    module.weight = nn.Parameter(codes, requires_grad=False)
    module.register_buffer("weight_scale", scale.to(_ACTIVATION_DTYPE), persistent=False)


def convert_linear_layers(model: nn.Module, cpu_weights: str) -> int:
    """Converts the weights of the model's linear layers in place (after loading) -> how many; "fp32" leaves
    them as they are. Layers whose input features are not a multiple of 32 keep their dtype under int4."""
    from dataplane.layers.embed_head import ParallelLMHead
    from dataplane.layers.linear import LinearBase

    if cpu_weights == "fp32":
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        if isinstance(module, ParallelLMHead):
            if cpu_weights == "int8":  # a copy of its own: a tied embedding keeps the fp32 rows it looks up
                _hold_int8(module, weight.data)
                count += 1
            continue
        if not isinstance(module, LinearBase):
            continue
        weight = weight.data
        if cpu_weights == "bf16":
            module.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        elif cpu_weights == "int4" and weight.shape[1] % INT4_GROUP_SIZE == 0:
            codes, scale_and_zero = quantize_int4(weight)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            module.weight = nn.Parameter(packed, requires_grad=False)
            module.register_buffer("weight_scale_and_zero", scale_and_zero.to(_ACTIVATION_DTYPE), persistent=False)
        elif cpu_weights == "int8":
            _hold_int8(module, weight)
        else:
            continue
        count += 1
    return count
