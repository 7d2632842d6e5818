"""load_model: builds the model for a Hugging Face folder or a GGUF file and loads its weights.

load_dummy_model builds the same model with random weights from the config alone
(config.json or GGUF metadata), for benchmarks where the real weights are not at hand.
Each whole checkpoint tensor is drawn from a generator seeded by its name and loaded
through the weight loaders, so every tensor-parallel size holds the same model.

Weights load Nano-vLLM style: one loop over checkpoint tensors; names of fused modules
go through the model's `packed_modules_mapping` to the fused parameter's `weight_loader`
with a shard id. Every parameter (and every shard of a fused one) must be loaded exactly
from the checkpoint and every checkpoint tensor must be used, or a WeightLoadError lists
what was missing and what was unexpected.
"""
from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from dataplane.layers.fp8 import fp8_supported, quantize_linear_layers
from dataplane.layers.linear import copy_weight
from dataplane.layers.moe import expert_target
from dataplane.model_config import ModelConfig
from dataplane.models import build_model
from dataplane.quantization import checkpoint_quantization, dequantized_tensors, resolve_quantization

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    pass


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _open_checkpoint(path: Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """-> (config, a lazy iterator over the checkpoint's (name, tensor) pairs: nothing is read until iterated)."""
    if path.suffix == ".gguf" and path.is_file():
        from dataplane.gguf_loader import read_gguf  # imported here: the gguf package is absent on some GPU hosts

        config, tensors = read_gguf(path)
        return config, tensors
    if path.is_dir():
        return read_hf_config(path), iter_safetensors(path)
    raise FileNotFoundError(f"{path} is neither a model folder nor a .gguf file")


def _build(config: ModelConfig, dtype: torch.dtype | str | None, device: torch.device | str) -> nn.Module:
    with torch.device(device), _default_dtype(resolve_dtype(dtype or config.torch_dtype)):
        return build_model(config)


def _quantization(config: ModelConfig, flag: str, device: torch.device | str) -> str:
    mode = resolve_quantization(flag, config.quantization_config)
    if mode == "fp8" and (why_not := fp8_supported(torch.device(device))):
        raise ValueError(f"--quantization fp8 cannot run here: {why_not}; use --quantization none")
    return mode


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               quantization: str = "auto") -> tuple[nn.Module, ModelConfig]:
    """path: an HF folder (config.json + safetensors) or a .gguf file; dtype None = the checkpoint's;
    quantization: auto | none | fp8 (dataplane/quantization.py)."""
    config, tensors = _open_checkpoint(Path(path))
    mode = _quantization(config, quantization, device)
    model = _build(config, dtype, device)
    if checkpoint_quantization(config.quantization_config):
        tensors = dequantized_tensors(tensors, resolve_dtype(dtype or config.torch_dtype))
    load_weights(model, tensors, source=str(path))
    if mode == "fp8":
        quantize_linear_layers(model)
    return model.eval(), config


def load_dummy_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                     seed: int = 0, quantization: str = "auto") -> tuple[nn.Module, ModelConfig]:
    """Like load_model, but only the config is read: weights are random, the same for a seed at any TP size."""
    config, _ = _open_checkpoint(Path(path))
    mode = _quantization(config, quantization, device)
    model = _build(config, dtype, device)
    seen = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # a tied LM head
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}"
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif param.dim() >= 2:
                    _load_random(module, name, param, seed)
                else:
                    param.zero_()
    if mode == "fp8":
        quantize_linear_layers(model)
    return model.eval(), config


def _load_random(module: nn.Module, name: str, param: nn.Parameter, seed: int) -> None:
    shapes = module.checkpoint_shapes(param) if hasattr(module, "checkpoint_shapes") else [(None, tuple(param.shape))]
    for shard_id, shape in shapes:
        generator = torch.Generator(param.device).manual_seed(seed ^ zlib.crc32(f"{name}/{shard_id}".encode()))
        # HF's initializer_range 0.02: activations keep a realistic scale
        whole = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(0.0, 0.02, generator=generator)
        loader = getattr(param, "weight_loader", None) or (lambda p, w: copy_weight(p.data, w))
        if shard_id is None:
            loader(param, whole)
        else:
            loader(param, whole, shard_id)


def read_hf_config(folder: Path) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = ModelConfig.from_hf_config(json.loads(config_file.read_text()), model_name=folder.name)
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():  # chat models list their end-of-turn tokens here
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
        extra = [] if eos is None else eos if isinstance(eos, list) else [eos]
        config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *extra]))
    return config


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _packed_target(name: str, mapping: dict, model: nn.Module) -> tuple[str, object]:
    for fragment, ours in getattr(model, "checkpoint_renames", {}).items():
        name = name.replace(fragment, ours)
    expert = expert_target(name, getattr(model, "expert_projections", {}))
    if expert is not None:
        return expert
    for fragment, (packed, shard_id) in mapping.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{packed}."), shard_id
    return name, None


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str = "") -> None:
    mapping = getattr(model, "packed_modules_mapping", {})
    config = getattr(model, "config", None)
    tied = bool(config is not None and config.tie_word_embeddings)
    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as the embedding
    expected = {name: getattr(param, "shard_ids", None)
                or {sid for packed, sid in mapping.values() if f".{packed}." in name} or {None}
                for name, param in params.items()}
    loaded: dict[str, set] = {name: set() for name in params}
    unexpected = []
    with torch.no_grad():
        for name, tensor in tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            param_name, shard_id = _packed_target(name, mapping, model)
            param = params.get(param_name)
            if param is None:
                unexpected.append(name)
                continue
            weight_loader = getattr(param, "weight_loader", None) or (lambda p, w: copy_weight(p.data, w))
            try:
                if shard_id is None:
                    weight_loader(param, tensor)
                else:
                    weight_loader(param, tensor, shard_id)
            except (ValueError, RuntimeError) as e:  # shape mismatch, or a shard outside the tensor
                raise WeightLoadError(f"{source}: cannot load {name!r} into {param_name!r}: {e}") from e
            loaded[param_name].add(shard_id)
    missing = [name if want == {None} else f"{name} (shards {sorted(map(str, want - loaded[name]))})"
               for name, want in expected.items() if want - loaded[name]]
    if missing or unexpected:
        raise WeightLoadError(f"{source}: checkpoint does not match the {type(model).__name__} model: "
                              f"{_listing('missing', missing)}{_listing('unexpected', unexpected)}")


def _listing(what: str, names: list[str], limit: int = 10) -> str:
    if not names:
        return ""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {what} weights: {', '.join(names[:limit])}{more}. "
