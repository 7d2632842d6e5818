"""The roofline of a run: per step, the larger of its bytes / bandwidth and its FLOPs / peak, summed.

A step's bytes: every weight it reads once (for an MoE layer only the experts its tokens
chose: for T tokens routed top-k of E experts uniformly, E * (1 - (1 - k/E)^T) of them are
expected to be touched; random weights route close to uniformly), the LM head, and the KV of
each sequence's whole context (at the KV cache's element size, so an FP8 cache counts half).
A step's FLOPs: 2 per active weight per token (top-k experts for MoE), the LM head for the
sampled rows, and attention's 4 * heads * head_dim per (query, key) pair it computes. The
bandwidth is a measured device-to-device copy, the peak a measured GEMM (bf16, or FP8 with
--quantization fp8), so the fraction compares the engine with what this GPU really does.

Model architectures for random-weight runs (`--model-arch`) are listed in ARCHS as the
config.json each writes.
"""
from __future__ import annotations

from dataclasses import dataclass

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu",
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}
ARCHS = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-30b-a3b": QWEN3_30B_A3B, "llama3-8b": LLAMA3_8B}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of one layer's parts and of the LM head, from an HF config dict."""

    num_layers: int
    hidden: int
    attention_params: int  # q, k, v, o of one layer
    dense_mlp_params: int  # gate, up, down of a dense layer (0 for an all-MoE model)
    expert_params: int  # gate, up, down of one expert
    num_experts: int
    top_k: int
    lm_head_params: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_hf(cls, h: dict) -> ModelShape:
        hidden, heads, kv_heads, head_dim = (h["hidden_size"], h["num_attention_heads"], h["num_key_value_heads"],
                                             h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"])
        experts = h.get("num_experts") or h.get("num_local_experts") or 0
        return cls(
            num_layers=h["num_hidden_layers"], hidden=hidden,
            attention_params=hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden,
            dense_mlp_params=0 if experts else 3 * hidden * h["intermediate_size"],
            expert_params=3 * hidden * (h.get("moe_intermediate_size") or h["intermediate_size"]) if experts else 0,
            num_experts=experts, top_k=h.get("num_experts_per_tok", 0), lm_head_params=h["vocab_size"] * hidden,
            num_heads=heads, head_dim=head_dim)

    def experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts per MoE layer that num_tokens tokens choose (uniform routing)."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** num_tokens)

    def step_bytes(self, num_tokens: int, kv_tokens_read: int, weight_bytes: float, kv_bytes_per_token: int,
                   head_bytes: float = 2.0) -> float:
        layer = self.attention_params + self.dense_mlp_params + self.experts_touched(num_tokens) * self.expert_params
        return (self.num_layers * layer * weight_bytes + self.lm_head_params * head_bytes
                + kv_tokens_read * kv_bytes_per_token)

    def step_flops(self, num_tokens: int, num_sampled: int, attention_pairs: float) -> float:
        active = self.attention_params + self.dense_mlp_params + self.top_k * self.expert_params
        return (2.0 * self.num_layers * active * num_tokens + 2.0 * self.lm_head_params * num_sampled
                + 4.0 * self.num_layers * self.num_heads * self.head_dim * attention_pairs)


@dataclass(frozen=True)
class StepShape:
    """What one step computed: its runs' first positions and new-token counts, and how many rows it sampled."""

    starts: tuple[int, ...]
    num_tokens: tuple[int, ...]
    num_sampled: int

    @property
    def kv_tokens_read(self) -> int:
        return sum(s + n for s, n in zip(self.starts, self.num_tokens))

    @property
    def attention_pairs(self) -> float:
        # query j of a run of n new tokens starting at s attends to s + j + 1 keys
        return sum(n * s + n * (n + 1) / 2 for s, n in zip(self.starts, self.num_tokens))


def roofline_s(steps: list[StepShape], shape: ModelShape, weight_bytes: float, kv_bytes_per_token: int,
               bandwidth: float, peak_flops: float) -> float:
    total = 0.0
    for step in steps:
        num_tokens = sum(step.num_tokens)
        bytes_s = shape.step_bytes(num_tokens, step.kv_tokens_read, weight_bytes, kv_bytes_per_token) / bandwidth
        flops_s = shape.step_flops(num_tokens, step.num_sampled, step.attention_pairs) / peak_flops
        total += max(bytes_s, flops_s)
    return total


def measured_peak_flops(device, fp8: bool) -> float:
    """FLOP/s of a large GEMM on this GPU: bf16, or FP8 through torch._scaled_mm."""
    import torch

    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        run = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        run = lambda: a @ b  # noqa: E731
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]
