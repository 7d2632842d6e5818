"""SiLU-and-multiply: the gate of a gated MLP, applied to the merged gate/up projection.

On CUDA one Triton kernel (fused_ops.py); the torch code is the CPU path and the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from dataplane.layers import fused_ops
except ModuleNotFoundError as e:  # no Triton: the torch code is the only path
    if e.name != "triton":
        raise
    fused_ops = None


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops is not None and fused_ops.enabled_for(x):
            return fused_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
