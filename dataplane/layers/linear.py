"""Linear layers split for tensor parallelism, each loading its own shard of a checkpoint weight.

Column-parallel layers split the output features over ranks; row-parallel layers split
the input features and sum the partial outputs (all-reduce). Merged and QKV layers hold
several checkpoint tensors side by side; their `weight_loader` takes a shard id saying
which one it is given, so the loader can stay one loop over checkpoint keys.
`checkpoint_shapes(param)` lists the whole checkpoint tensors (shard id, shape) a
parameter loads from, so random weights can be made once for every TP size (loader.py).
When a model has fewer KV heads than ranks, each KV head is replicated on
tp_size / num_kv_heads ranks (as vLLM does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dataplane.distributed import all_reduce, divide, get_tp_rank, get_tp_size, local_num_kv_heads
from dataplane.cpu_weights import INT4_DTYPE, INT8_DTYPE, bf16_linear, int4_linear, int8_linear
from dataplane.layers.fp8 import FP8_DTYPE, fp8_linear

try:
    from dataplane.layers import skinny_gemm
except ModuleNotFoundError as e:  # no Triton: F.linear is the only path
    if e.name != "triton":
        raise
    skinny_gemm = None


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    # copy_ would broadcast a wrongly shaped tensor silently; a checkpoint mismatch must fail loudly
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: checkpoint has {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_dim: int | None = None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        raise NotImplementedError

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        """(shard id or None, shape) of each whole checkpoint tensor that param loads a part of."""
        shape = list(param.shape)
        if self.tp_dim is not None and self.tp_dim < param.dim():
            shape[self.tp_dim] *= self.tp_size
        return [(None, tuple(shape))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight.dtype == FP8_DTYPE:  # quantised at load (layers/fp8.py)
            return fp8_linear(x, self.weight, self.weight_scale, bias)
        if self.weight.dtype != x.dtype:  # --cpu-weights, converted at load (dataplane/cpu_weights.py)
            if self.weight.dtype == INT4_DTYPE:
                return int4_linear(x, self.weight, self.weight_scale_and_zero, bias)
            if self.weight.dtype == INT8_DTYPE:
                return int8_linear(x, self.weight, self.weight_scale, bias)
            return bf16_linear(x, self.weight, bias)
        if skinny_gemm is not None and skinny_gemm.use_for(x, self.weight):  # decode-sized M on CUDA
            return skinny_gemm.skinny_linear(x, self.weight, bias)
        return F.linear(x, self.weight, bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        copy_weight(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, get_tp_size()), bias, tp_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard_size = param.data.size(0)
        copy_weight(param.data, loaded_weight.narrow(0, self.tp_rank * shard_size, shard_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up projections)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: int) -> None:
        shard_offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        shard_size = self.output_sizes[loaded_shard_id] // self.tp_size
        dst = param.data.narrow(0, shard_offset, shard_size)
        copy_weight(dst, loaded_weight.narrow(0, self.tp_rank * shard_size, shard_size))

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        return [(i, (size, *param.shape[1:])) for i, size in enumerate(self.output_sizes)]


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul; each rank holds its heads of all three."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False):
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size)
        self.num_kv_heads = local_num_kv_heads(total_num_kv_heads, tp_size)
        # ranks sharing one replicated KV head load the same rows
        replicas = max(1, tp_size // total_num_kv_heads)
        self.kv_shard_index = get_tp_rank() // replicas
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str) -> None:
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        if loaded_shard_id not in offsets:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {loaded_shard_id!r}")
        shard_offset, shard_size = offsets[loaded_shard_id]
        shard_index = self.tp_rank if loaded_shard_id == "q" else self.kv_shard_index
        dst = param.data.narrow(0, shard_offset, shard_size)
        copy_weight(dst, loaded_weight.narrow(0, shard_index * shard_size, shard_size))

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        heads = {"q": self.total_num_heads, "k": self.total_num_kv_heads, "v": self.total_num_kv_heads}
        return [(sid, (n * self.head_size, *param.shape[1:])) for sid, n in heads.items()]


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, get_tp_size()), output_size, bias, tp_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is not split: rank 0 adds it once
            copy_weight(param.data, loaded_weight)
            return
        shard_size = param.data.size(1)
        copy_weight(param.data, loaded_weight.narrow(1, self.tp_rank * shard_size, shard_size))

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        if param.dim() == 1:
            return [(None, tuple(param.shape))]
        return [(None, (param.shape[0], param.shape[1] * self.tp_size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y)
