"""The mixture-of-experts MLP: a router picks top-k experts per token, the experts' gated MLPs run, weighted.

`SparseMoeBlock` = router (`gate`, replicated) + `FusedMoE` (every expert's weights stacked in two
tensors: `w13_weight` [E, 2 * I, H] holds gate and up rows, `w2_weight` [E, H, I] the down
projection). Under tensor parallelism each rank holds the same slice of every expert's
intermediate dimension (gate/up rows, down columns), as the dense MLP's column/row split does, and
the block ends with the dense MLP's all-reduce. On CUDA the experts run as two grouped GEMMs in
Triton (fused_moe.py); the torch loop over experts here is the CPU path and the kernel's reference.

Checkpoints store one tensor per expert and projection (`...experts.3.gate_proj.weight`,
Mixtral's `...experts.3.w1.weight`); `expert_target` maps such a name to the stacked parameter and
the shard id (expert, 0 gate | 1 up | 2 down) its weight_loader takes.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from dataplane.distributed import all_reduce, divide, get_tp_rank, get_tp_size
from dataplane.layers.linear import ReplicatedLinear, copy_weight

try:
    from dataplane.layers import fused_moe
except ModuleNotFoundError as e:  # no Triton: the torch loop is the only path
    if e.name != "triton":
        raise
    fused_moe = None

GATE, UP, DOWN = 0, 1, 2
_EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


def expert_target(name: str, projections: dict[str, int]) -> tuple[str, tuple[int, int]] | None:
    """'...experts.3.up_proj.weight' -> ('...experts.w13_weight', (3, UP)); None for other names.
    projections: the checkpoint's projection names -> GATE, UP or DOWN."""
    match = _EXPERT_WEIGHT.search(name)
    if match is None or match.group(2) not in projections:
        return None
    which = projections[match.group(2)]
    stacked = "w2_weight" if which == DOWN else "w13_weight"
    return f"{name[:match.start()]}.experts.{stacked}", (int(match.group(1)), which)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k] int32).
    Softmax over all experts in fp32, then the top k; renormalize makes them sum to 1 (Mixtral's softmax
    over the top-k logits is the same thing, Qwen3-MoE's norm_topk_prob chooses)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids.to(torch.int32)


def experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H] through each token's top-k experts, weighted and summed -> [T, H] in x's dtype.
    One gated MLP per expert over the tokens routed to it (the CPU path; HF's order of operations)."""
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten().long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    flat_weights = topk_weights.flatten()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * flat_weights[pairs, None]
        out.index_add_(0, tokens, y.to(x.dtype))
    return out


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts = num_experts
        self.intermediate_size = divide(intermediate_size, self.tp_size)  # this rank's slice of each expert
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_size, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate_size),
                                      requires_grad=False)
        for param, which in ((self.w13_weight, (GATE, UP)), (self.w2_weight, (DOWN,))):
            param.weight_loader = self.weight_loader
            param.shard_ids = {(e, w) for e in range(num_experts) for w in which}  # the loader checks all came

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[int, int]) -> None:
        expert, which = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside the model's {self.num_experts} experts")
        size = self.intermediate_size
        if which == DOWN:  # [H, I]: this rank's columns
            copy_weight(param.data[expert], loaded_weight.narrow(1, self.tp_rank * size, size))
        else:  # [I, H]: this rank's rows, into the gate (first) or up (second) half
            copy_weight(param.data[expert].narrow(0, which * size, size),
                        loaded_weight.narrow(0, self.tp_rank * size, size))

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        whole = self.intermediate_size * self.tp_size
        hidden = param.shape[1] if param is self.w2_weight else param.shape[2]
        return [((e, w), (hidden, whole) if w == DOWN else (whole, hidden)) for e, w in sorted(param.shard_ids)]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum (the caller all-reduces)."""
        if fused_moe is not None and x.is_cuda:
            return fused_moe.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return experts_torch(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + experts in place of a decoder layer's dense MLP (Qwen3-MoE's `mlp`, Mixtral's `block_sparse_moe`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return all_reduce(self.experts(x, topk_weights, topk_ids))
