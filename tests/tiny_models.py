"""Tiny random Hugging Face models of the real supported architectures, saved as safetensors folders.

`save_tiny_model("qwen3", path)` writes config.json, generation_config.json and the
weights (sharded with model.safetensors.index.json when max_shard_size is given). The
weights are deterministic for a seed. Norm weights and biases are randomised too (HF
initialises them to ones and zeros), so a loader that swaps or drops them is caught.
Other fixtures may add a tokenizer to the same folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than HF's 0.02 so greedy choices are not near-ties
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "qwen3": (Qwen3Config, dict(num_hidden_layers=2, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "qwen2": (Qwen2Config, dict(num_hidden_layers=3, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})),
    # llama3 rope scaling with a short original context, so all three frequency bands occur
    "llama": (LlamaConfig, dict(num_hidden_layers=2, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # 8 experts, top 2; the last layer dense (mlp_only_layers), so both kinds of layer run
    "qwen3_moe": (Qwen3MoeConfig, dict(num_hidden_layers=3, tie_word_embeddings=False, num_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                       mlp_only_layers=[2],
                                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "mixtral": (MixtralConfig, dict(num_hidden_layers=2, tie_word_embeddings=False, intermediate_size=48,
                                    num_local_experts=6, num_experts_per_tok=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
}


def tiny_config(arch: str, vocab_size: int = 512, **overrides):
    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; have {', '.join(TINY_CONFIGS)}")
    config_cls, specific = TINY_CONFIGS[arch]
    return config_cls(**{**_COMMON, **specific, "vocab_size": vocab_size, **overrides})


def save_tiny_model(arch: str, path: str | Path, *, vocab_size: int = 512, seed: int = 0,
                    max_shard_size: str | int | None = None, **overrides) -> Path:
    """Builds a tiny random fp32 model of `arch` (a key of TINY_CONFIGS) and saves it at path."""
    path = Path(path)
    config = tiny_config(arch, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.1)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    return path
