"""Token embedding and LM head, both split over the vocabulary for tensor parallelism.

Each rank holds ceil(vocab / tp_size) rows; the last rank's tail past the vocabulary is
zero padding (vLLM pads the same way), so any vocabulary splits over any TP size. The
LM head gathers the ranks' logits on rank 0 alone, the only rank that samples; the
other ranks get None and must make the same calls, since the gather is a collective.
With tied embeddings the LM head shares the embedding's Parameter (see the model's
CausalLM class), so a checkpoint loads it once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dataplane.distributed import all_reduce, gather_to_rank0, get_tp_rank, get_tp_size
from dataplane.cpu_weights import INT8_DTYPE, int8_linear
from dataplane.layers.linear import copy_weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start_idx = min(self.num_embeddings_per_partition * self.tp_rank, num_embeddings)
        self.vocab_end_idx = min(self.vocab_start_idx + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(f"weight shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, the model "
                             f"expects ({self.num_embeddings}, {param.shape[1]})")
        rows = self.vocab_end_idx - self.vocab_start_idx
        copy_weight(param.data[:rows], loaded_weight.narrow(0, self.vocab_start_idx, rows))
        param.data[rows:].zero_()

    def checkpoint_shapes(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        return [(None, (self.num_embeddings, param.shape[1]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.vocab_start_idx) & (x < self.vocab_end_idx)
        y = F.embedding(mask * (x - self.vocab_start_idx), self.weight)
        return all_reduce(mask.unsqueeze(-1) * y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] on rank 0; None on the other ranks."""
        if self.weight.dtype == INT8_DTYPE:  # --cpu-weights int8 (dataplane/cpu_weights.py)
            logits = int8_linear(x, self.weight, self.weight_scale)
        else:
            logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        parts = gather_to_rank0(logits.contiguous())
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, :self.num_embeddings]
