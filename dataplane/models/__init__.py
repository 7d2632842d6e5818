"""Model classes by architecture name; build_model(config) constructs one (weights uninitialised)."""
from __future__ import annotations

from torch import nn

from dataplane.model_config import ModelConfig
from dataplane.models.llama import LlamaForCausalLM
from dataplane.models.mixtral import MixtralForCausalLM
from dataplane.models.qwen2 import Qwen2ForCausalLM
from dataplane.models.qwen3 import Qwen3ForCausalLM
from dataplane.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
}


def build_model(config: ModelConfig) -> nn.Module:
    """Parameters take torch's default dtype and device: set them (as the loader does) before calling."""
    if config.architecture not in MODEL_CLASSES:
        raise ValueError(f"no model class for architecture {config.architecture!r}; "
                         f"supported: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[config.architecture](config)
