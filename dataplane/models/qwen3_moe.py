"""Qwen3-MoE: Qwen3's decoder (per-head q/k RMSNorm) with a mixture of experts in the sparse layers.

The config decides which layers are sparse, the router's top-k and whether the top-k
probabilities are renormalised (norm_topk_prob); see layers/moe.py.
"""
from __future__ import annotations

from dataplane.model_config import ModelConfig
from dataplane.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qk_norm=True)
