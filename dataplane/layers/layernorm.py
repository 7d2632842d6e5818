"""RMSNorm, alone or fused with the residual add that precedes it in every decoder layer.

On CUDA one Triton kernel per call (fused_ops.py); the torch code below is the CPU path and
the reference (NANOPLANE_DISABLE_FUSED_OPS=1 forces it everywhere).
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from dataplane.layers import fused_ops
except ModuleNotFoundError as e:  # no Triton: the torch code is the only path
    if e.name != "triton":
        raise
    fused_ops = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor, orig_dtype: torch.dtype) -> torch.Tensor:
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(orig_dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if fused_ops is not None and fused_ops.enabled_for(x):
            if residual is None:
                return fused_ops.rms_norm(x, self.weight, self.eps)
            return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        orig_dtype = x.dtype
        if residual is None:
            return self._norm(x.float(), orig_dtype)
        # the sum is taken in fp32 and normed from there; the residual stream is kept in the model dtype
        x = x.float() + residual.float()
        return self._norm(x, orig_dtype), x.to(orig_dtype)
