"""Reads a GGUF file: its ModelConfig from the metadata, its tensors dequantised under HF names.

The tensors come out as fp32 torch tensors named as in a Hugging Face checkpoint, so
loader.py loads them with the same loop as safetensors. llama.cpp stores the Q and K
projections of the "llama" architecture with the rows of each head interleaved (for
its GPT-J style RoPE); they are put back in HF's rotate-half order here. Qwen2 and Qwen3
use NEOX-style RoPE in llama.cpp and are stored unpermuted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from dataplane.model_config import ModelConfig
from proto.model_names import model_name_of_file

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_REQUIRED = object()


def read_gguf(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """-> (config, iterator of (HF parameter name, fp32 tensor)); tensors are dequantised lazily."""
    reader = GGUFReader(path)
    config = config_from_gguf(reader, name=model_name_of_file(str(path)))
    return config, iter_gguf_tensors(reader, config)


def _meta(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def config_from_gguf(reader: GGUFReader, name: str = "") -> ModelConfig:
    """name: the served model name (the file's, proto/model_names.py); empty = GGUF's general.name."""
    arch = _meta(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF carries rope_freqs (Llama 3.1-style rope scaling factors), which is not supported")
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling!r}")

    def m(key: str, default: Any = _REQUIRED) -> Any:
        value = _meta(reader, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"GGUF metadata {arch}.{key} varies per layer ({value}), which is not supported")
        return value

    hidden_size = int(m("embedding_length"))
    num_heads = int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", 0)) or hidden_size // num_heads
    rope_dim = int(m("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embedding (rope dimension {rope_dim}, head dim {head_dim}) is not supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor")
    eos_ids = [int(_meta(reader, key)) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if key in reader.fields]
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(m("vocab_size", 0)) or int(embed.shape[-1]),
        hidden_size=hidden_size,
        intermediate_size=int(m("feed_forward_length")),
        num_hidden_layers=int(m("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(m("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(m("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        bos_token_id=None if bos is None else int(bos),
        torch_dtype="float32",  # the dequantised weights; the caller picks the compute dtype
        model_name=name or _meta(reader, "general.name", ""),
    )


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF parameter name; unknown names come back unchanged (the loader reports them)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _LAYER_NAMES:
        return ".".join(["model.layers", parts[1], _LAYER_NAMES[parts[2]], *parts[3:]])
    if parts[0] in _GLOBAL_NAMES and len(parts) >= 2:
        return ".".join([_GLOBAL_NAMES[parts[0]], *parts[1:]])
    return gguf_name


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleave: [n_head, hd/2, 2, ...] -> [n_head, 2, hd/2, ...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_to_numpy(t: ReaderTensor) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions fastest-first
    return dequantize(t.data, t.tensor_type).reshape(shape)


def iter_gguf_tensors(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for t in reader.tensors:
        arr = tensor_to_numpy(t)
        if config.architecture == "llama":
            if ".attn_q." in t.name:
                arr = unpermute_qk(arr, config.num_attention_heads)
            elif ".attn_k." in t.name:
                arr = unpermute_qk(arr, config.num_key_value_heads)
        # F32 tensors are read-only views of the memory-mapped file; torch wants its own copy
        yield hf_name(t.name), torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
