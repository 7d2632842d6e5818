"""Loading weights: HF folders (errors included), ModelConfig, the KV cache helpers, and GGUF files."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dataplane.context import AttentionMetadata, forward_context
from dataplane.gguf_loader import read_gguf
from dataplane.kv_cache import allocate_kv_cache, bind_kv_cache, num_blocks_for_bytes
from dataplane.layers.attention import Attention
from dataplane.loader import WeightLoadError, load_dummy_model, load_model
from dataplane.model_config import ModelConfig
from tests.tiny_models import save_tiny_model

def prefill_logits(model, config, prompt: list[int], block_size: int = 16, kv_dtype=torch.float32) -> torch.Tensor:
    """One sequence's prefill through a fresh paged cache (blocks in reverse order) -> logits [len, vocab]."""
    num_blocks = -(-len(prompt) // block_size)
    bind_kv_cache(model, allocate_kv_cache(config, num_blocks, block_size, kv_dtype, "cpu"))
    table = list(reversed(range(num_blocks)))
    slots = [table[p // block_size] * block_size + p % block_size for p in range(len(prompt))]
    n = len(prompt)
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor([0, n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.tensor([table], dtype=torch.int32),
                             max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
    with torch.inference_mode(), forward_context(meta):
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(n)))


def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()


# ---- HF folders ----

@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def rewrite_weights(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        (dst / name).write_text((src / name).read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_tied_lm_head_shares_the_embedding(qwen3_dir):
    model, config = load_model(qwen3_dir, dtype=torch.float32)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_weight_is_named(qwen3_dir, tmp_path):
    path = rewrite_weights(qwen3_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"1 missing weights: model\.layers\.1\.self_attn\.qkv_proj\.weight "
                                              r"\(shards \['k'\]\)"):
        load_model(path)


def test_unexpected_weight_is_named(qwen3_dir, tmp_path):
    path = rewrite_weights(qwen3_dir, tmp_path / "u", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match=r"1 unexpected weights: model\.extra\.weight"):
        load_model(path)


def test_wrong_shape_is_refused(qwen3_dir, tmp_path):
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:10]
    with pytest.raises(WeightLoadError, match=r"'model\.norm\.weight'.*checkpoint has \(10,\)"):
        load_model(rewrite_weights(qwen3_dir, tmp_path / "s", shrink))

    def shrink_k(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    with pytest.raises(WeightLoadError, match=r"cannot load 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_model(rewrite_weights(qwen3_dir, tmp_path / "k", shrink_k))


def test_ignored_weights(qwen3_dir, tmp_path):
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()  # tied: the head is the embedding
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    load_model(rewrite_weights(qwen3_dir, tmp_path / "i", add))


def test_dummy_model_needs_only_the_config(qwen3_dir, tmp_path):
    (tmp_path / "config.json").write_text((qwen3_dir / "config.json").read_text())
    torch.manual_seed(0)
    model, config = load_dummy_model(tmp_path, dtype=torch.bfloat16)
    assert config.architecture == "qwen3" and model.model.norm.weight.dtype == torch.bfloat16
    assert 0.01 < model.model.layers[0].mlp.down_proj.weight.float().std() < 0.03
    logits = prefill_logits(model, config, list(range(20)), kv_dtype=torch.bfloat16)
    assert logits.shape == (20, config.vocab_size) and torch.isfinite(logits).all()


def test_not_a_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path / "absent.gguf")


# ---- ModelConfig ----

def hf_config(**changes) -> dict:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": [5, 6],
            "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
    return {**base, **changes}


def test_model_config_from_hf_dict():
    config = ModelConfig.from_hf_config(hf_config())
    assert (config.architecture, config.head_dim, config.eos_token_ids, config.torch_dtype) == ("llama", 16, [5, 6], "bfloat16")
    assert config.rope_scaling is None
    assert ModelConfig.from_hf_config(hf_config(architectures=["MistralForCausalLM"])).architecture == "llama"
    qwen2 = ModelConfig.from_hf_config(hf_config(architectures=["Qwen2ForCausalLM"]))
    assert qwen2.attention_bias
    assert config.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 2 * 16 * 2


def test_model_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="unsupported model architecture.*GPT2LMHeadModel"):
        ModelConfig.from_hf_config(hf_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_hf_config(hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf_config(hf_config(architectures=["MistralForCausalLM"], model_type="mistral",
                                             sliding_window=4096, max_position_embeddings=32768))


def test_generation_config_eos_ids_are_added(tmp_path):
    path = save_tiny_model("qwen3", tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    _, config = load_model(path)
    assert config.eos_token_ids == [2, 7]


# ---- KV cache helpers ----

def test_kv_cache_allocate_bind_and_size(qwen3_dir):
    model, config = load_model(qwen3_dir)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    with pytest.raises(RuntimeError, match="KV cache"):
        layers[0](torch.zeros(1, 64), torch.zeros(1, 32), torch.zeros(1, 32))
    kv = allocate_kv_cache(config, num_blocks=5, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert kv.shape == (2, 2, 5, 16, 2, 16) and kv.dtype == torch.bfloat16
    bind_kv_cache(model, kv)
    assert layers[1].v_cache.data_ptr() == kv[1, 1].data_ptr()
    per_block = config.kv_bytes_per_token(torch.bfloat16) * 16
    assert num_blocks_for_bytes(config, 16, torch.bfloat16, 7 * per_block + per_block - 1) == 7
    with pytest.raises(ValueError, match="layers"):
        bind_kv_cache(model, kv[:1])


# ---- GGUF ----

LLAMA_CPP_LAYER_NAMES = {  # HF module -> llama.cpp tensor kind, written out independently of the loader
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to the llama Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(hf_dir: Path, out: Path) -> Path:
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny " + arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        arr = tensor.numpy()
        if name.startswith("model.layers."):
            _, _, layer, *module, suffix = name.split(".")
            kind = LLAMA_CPP_LAYER_NAMES[".".join(module)]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                arr = llama_cpp_permute(arr, cfg["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
            gguf_name = f"blk.{layer}.{kind}.{suffix}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(gguf_name, np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_written_like_llama_cpp_matches_hf(arch, tmp_path):
    plain_rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}} if arch == "llama" else {}
    hf_dir = save_tiny_model(arch, tmp_path / "hf", **plain_rope)
    gguf_path = write_gguf_like_llama_cpp(hf_dir, tmp_path / f"tiny-{arch}.gguf")
    model, config = load_model(gguf_path, dtype=torch.float32)
    # served under the file's name, not general.name ("tiny llama"): proto/model_names.py
    assert (config.architecture, config.model_name, config.eos_token_ids) == (arch, f"tiny-{arch}", [2])
    assert config.tie_word_embeddings == (arch == "qwen3") and config.attention_bias == (arch == "qwen2")
    prompt = torch.randint(3, 512, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(prefill_logits(model, config, prompt), hf_logits(hf, prompt), atol=1e-4, rtol=0)


def test_smollm2_gguf_config(smollm2_gguf):  # the fixture (tests/conftest.py) skips when not installed
    config, _ = read_gguf(smollm2_gguf)
    assert (config.architecture, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == ("llama", 30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings, config.rope_theta) == (49152, 8192, 100000.0)
    assert config.tie_word_embeddings and config.eos_token_ids == [2] and config.bos_token_id == 1


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    path = Path(smollm2_gguf)
    model, config = load_model(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # SmolLM2's chat template around "What is the capital of France?" (37 tokens: three cache blocks)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    ours, reference = prefill_logits(model, config, prompt), hf_logits(hf, prompt)
    assert (ours - reference).abs().max() < 1e-3
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    tokens = list(prompt)
    for _ in range(7):
        tokens.append(int(prefill_logits(model, config, tokens)[-1].argmax()))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)[0].tolist()
    assert tokens == expected  # "The capital of France is Paris."
