"""The Llama-family decoder (Llama, SmolLM2, Mistral; Qwen2, Qwen3, Qwen3-MoE and Mixtral via flags).

attention (fused QKV, optional bias, optional per-head q/k RMSNorm, RoPE; on CUDA the norms,
RoPE and the KV store are one kernel, see layers/attention.py) -> MLP (fused
gate/up, SiLU-and-mul, down; or, where the config has experts, a mixture of experts from
layers/moe.py) -> decoder layer (pre-norm, residual fused into the norms) -> model -> causal
LM head. Architecture differences are constructor flags and checkpoint names; the other
modules of models/ only set them.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.distributed import divide, get_tp_size, local_num_kv_heads
from dataplane.layers.activation import SiluAndMul
from dataplane.layers.attention import Attention
from dataplane.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from dataplane.layers.layernorm import RMSNorm
from dataplane.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from dataplane.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from dataplane.layers.rotary import RotaryEmbedding
from dataplane.model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, qkv_bias: bool, o_proj_bias: bool, qk_norm: bool):
        super().__init__()
        tp_size = get_tp_size()
        self.head_dim = config.head_dim
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_kv_heads = local_num_kv_heads(config.num_key_value_heads, tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=o_proj_bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, self.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        if self.attn.fuses_qkv(qkv):
            norms = (self.q_norm, self.k_norm) if self.qk_norm else ()
            return self.o_proj(self.attn.forward_qkv(qkv, positions, self.rotary_emb, *norms))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).view(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, **attention_flags):
        super().__init__()
        self.self_attn = LlamaAttention(config, **attention_flags)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                                      config.num_experts_per_tok, config.norm_topk_prob)
        else:
            self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, **attention_flags):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, **attention_flags) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused module, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # per-expert checkpoint projections -> which part of the stacked expert weights (layers/moe.py)
    expert_projections = {"gate_proj": GATE, "up_proj": UP, "down_proj": DOWN}
    # checkpoint name fragment -> ours, applied before the mappings above
    checkpoint_renames: dict[str, str] = {}

    def __init__(self, config: ModelConfig, *, qkv_bias: bool | None = None, o_proj_bias: bool | None = None,
                 qk_norm: bool = False):
        super().__init__()
        self.config = config
        self.model = LlamaModel(
            config,
            qkv_bias=config.attention_bias if qkv_bias is None else qkv_bias,
            o_proj_bias=config.attention_bias if o_proj_bias is None else o_proj_bias,
            qk_norm=qk_norm,
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, hidden]; attention reads dataplane.context."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype on tensor-parallel rank 0, None on the
        others. Not widened to float32 here: the fused sampler reads bf16 logits once (half the bytes of a
        [256, 151936] step's), and the consumers that need float32 (logprobs, penalties) convert."""
        return self.lm_head(hidden_states)
