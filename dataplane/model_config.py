"""ModelConfig: the architecture facts the data plane needs, read from an HF config.json dict.

The GGUF reader (gguf_loader.py) fills the same dataclass from GGUF metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dataplane.layers.rotary import SUPPORTED_ROPE_TYPES, rope_type_of

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE; else HF's dict with "rope_type" (only "llama3")
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 also o_proj)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str = "float32"  # the checkpoint's dtype name, e.g. "bfloat16"
    model_name: str = ""
    # mixture of experts (0 experts = a dense model); intermediate_size is then the dense layers' MLP width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral always does)
    dense_mlp_layers: list[int] = field(default_factory=list)  # layers of an MoE model with a dense MLP
    # the checkpoint's own quantization_config (e.g. {"quant_method": "fp8", "weight_block_size": [128, 128]})
    quantization_config: dict | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            self.rope_scaling = None
        if (self.architecture in MOE_ARCHITECTURES) != (self.num_experts > 0):
            raise ValueError(f"architecture {self.architecture!r} with {self.num_experts} experts: the MoE "
                             f"architectures ({', '.join(MOE_ARCHITECTURES)}) and only they have experts")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_mlp_layers

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V over all layers for one token of context (all tensor-parallel ranks together)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size

    @classmethod
    def from_hf_config(cls, hf: dict, model_name: str = "") -> ModelConfig:
        names = hf.get("architectures") or []
        known = [HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES]
        if not known:
            raise ValueError(f"unsupported model architecture {names or hf.get('model_type')!r}; "
                             f"supported: {', '.join(HF_ARCHITECTURES)}")
        architecture = known[0]
        _check_supported_features(hf)
        rope_theta, rope_scaling = _rope_from_hf(hf)
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        num_experts = 0
        if architecture in MOE_ARCHITECTURES:  # Qwen3-MoE says num_experts, Mixtral num_local_experts
            num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if architecture == "qwen2" else bool(hf.get("attention_bias", False)),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            bos_token_id=hf.get("bos_token_id"),
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."),
            model_name=model_name or hf.get("_name_or_path", ""),
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if num_experts else 0,
            # Mixtral's experts are intermediate_size wide; Qwen3-MoE's moe_intermediate_size
            moe_intermediate_size=(hf.get("moe_intermediate_size") or hf["intermediate_size"]) if num_experts else 0,
            norm_topk_prob=architecture == "mixtral" or bool(hf.get("norm_topk_prob", False)),
            dense_mlp_layers=_dense_mlp_layers(hf) if num_experts else [],
            quantization_config=hf.get("quantization_config"),
        )


def _dense_mlp_layers(hf: dict) -> list[int]:
    # Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers or skipped by decoder_sparse_step
    step = hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step]


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes "rope_parameters" (theta inside); older configs "rope_theta" + "rope_scaling"
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    return float(theta), params or None


def _check_supported_features(hf: dict) -> None:
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", hf.get("model_type") == "mistral")
    if uses_window and window is not None and window < hf.get("max_position_embeddings", 0):
        problems.append(f"sliding-window attention (window {window})")
    partial = hf.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        problems.append(f"partial rotary embedding (factor {partial})")
    if problems:
        raise ValueError("unsupported model features: " + "; ".join(problems))
