"""Tokenizer loading (GGUF, HF folder, cache) and chat templates, on the real SmolLM2 tokenizer."""
import json
import os
import time
from pathlib import Path

import pytest

from controlplane.serving.tokenizer import export_tokenizer, gguf_cache_path, load_tokenizer

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SAMPLE_TEXTS = ["Hello world", "The capital of France is Paris.", "héllo 😀 世界\n\tこんにちは", "  spaces  ",
                "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2\n"]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def exported_dir(smollm2_gguf, tmp_path_factory):
    return export_tokenizer(smollm2_gguf, str(tmp_path_factory.mktemp("smollm2-tokenizer")))


def test_gguf_tokenizer_facts(gguf_tokenizer):
    tok = gguf_tokenizer
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == [tok.hf.convert_tokens_to_ids("<|im_end|>")]
    assert set(tok.convert_ids_to_tokens(tok.all_special_ids)) >= {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    ids = tok.encode("Hello world")
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]
    assert tok.decode(ids) == "Hello world"


def test_chat_template_is_chatml(gguf_tokenizer):
    tok = gguf_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids) == expected
    assert ids == tok.encode(expected, add_special_tokens=False)
    assert ids.count(tok.hf.convert_tokens_to_ids("<|im_start|>")) == 5


def test_chat_template_default_system_and_no_generation_prompt(gguf_tokenizer):
    tok = gguf_tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert tok.decode(ids) == f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_unknown_role_is_named(gguf_tokenizer):
    with pytest.raises(ValueError, match="'wizard'"):
        gguf_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])
    with pytest.raises(ValueError, match="None"):
        gguf_tokenizer.apply_chat_template([{"content": "no role"}])


def test_gguf_and_exported_folder_agree(gguf_tokenizer, exported_dir):
    folder = load_tokenizer(exported_dir)
    assert folder.vocab_size == gguf_tokenizer.vocab_size
    assert folder.eos_token_ids == gguf_tokenizer.eos_token_ids
    assert folder.all_special_ids == gguf_tokenizer.all_special_ids
    for text in SAMPLE_TEXTS:
        ids = gguf_tokenizer.encode(text)
        assert folder.encode(text) == ids
        assert folder.decode(ids) == gguf_tokenizer.decode(ids) == text
        assert folder.decode(ids, skip_special_tokens=True) == gguf_tokenizer.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    assert folder.apply_chat_template(messages) == gguf_tokenizer.apply_chat_template(messages)


def test_generation_config_adds_eos_ids(exported_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(exported_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_tokenizer(str(folder)).eos_token_ids == [2, 0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(str(folder)).eos_token_ids == [2, 7]


def test_missing_chat_template_raises(gguf_tokenizer, exported_dir, tmp_path):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in Path(exported_dir).iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tok.encode("Hi there") == gguf_tokenizer.encode("Hi there")  # still usable for plain prompts


def test_bad_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def test_cache_key_follows_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPLANE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    first = gguf_cache_path(f)
    assert first.parent == tmp_path / "cache" / "tokenizers"
    os.utime(f, ns=(1, 1))
    second = gguf_cache_path(f)
    f.write_bytes(b"xy")
    os.utime(f, ns=(1, 1))
    assert len({first, second, gguf_cache_path(f)}) == 3


def test_gguf_load_is_cached(smollm2_gguf, tmp_path, monkeypatch, gguf_tokenizer):
    monkeypatch.setenv("NANOPLANE_CACHE_DIR", str(tmp_path))
    path = smollm2_gguf
    t0 = time.perf_counter()
    cold = load_tokenizer(path)
    cold_s = time.perf_counter() - t0
    assert (gguf_cache_path(Path(path)) / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    warm = load_tokenizer(path)
    warm_s = time.perf_counter() - t0
    assert warm_s < cold_s / 3, (cold_s, warm_s)
    assert warm.name == cold.name and warm.eos_token_ids == cold.eos_token_ids
    for text in SAMPLE_TEXTS:
        assert warm.encode(text) == cold.encode(text)
