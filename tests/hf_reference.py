"""Greedy reference tokens from Hugging Face transformers, the oracle for model parity."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

_models: dict[str, torch.nn.Module] = {}


def hf_model(path) -> torch.nn.Module:
    key = str(path)
    if key not in _models:
        _models[key] = AutoModelForCausalLM.from_pretrained(key, torch_dtype=torch.float32).eval()
    return _models[key]


@torch.inference_mode()
def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with a KV cache, never stopping at EOS (the engine runs with ignore_eos)."""
    model = hf_model(path)
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
