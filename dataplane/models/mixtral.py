"""Mixtral: the Llama decoder with a mixture of experts in every layer (softmax over the top-k router logits).

Its checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate),
w3 (up) and w2 (down).
"""
from __future__ import annotations

from dataplane.layers.moe import DOWN, GATE, UP
from dataplane.model_config import ModelConfig
from dataplane.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    expert_projections = {"w1": GATE, "w3": UP, "w2": DOWN}
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
