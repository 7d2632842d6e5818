"""Qwen2: the Llama decoder with a bias on the q/k/v projections (none on o_proj)."""
from __future__ import annotations

from dataplane.model_config import ModelConfig
from dataplane.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qkv_bias=True, o_proj_bias=False)
