"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE."""
from __future__ import annotations

from dataplane.model_config import ModelConfig
from dataplane.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qk_norm=True)
