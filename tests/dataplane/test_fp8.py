"""FP8 on CPU: e4m3 quantisation, FP8 linear layers, FP8 checkpoints and the FP8 KV cache.

torch has float8_e4m3fn tensors and torch._scaled_mm on CPU, so these run the GPU's code paths
(only slower); the `gpu` test runs the scaled GEMM on FP8 tensor cores.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dataplane.config import DataPlaneConfig
from dataplane.kv_fp8 import FP8_KV_DTYPE, FP8_MAX, calibrate_kv_scales
from dataplane.layers.fp8 import FP8_DTYPE, dequantize_rows, fp8_linear, fp8_supported, quantize_rows
from dataplane.layers.attention import Attention
from dataplane.loader import load_model
from dataplane.quantization import resolve_quantization
from tests.dataplane.test_models_parity import PagedDriver, random_prompt
from tests.tiny_models import save_tiny_model

E4M3_RELATIVE_STEP = 2.0 ** -4  # 3 mantissa bits: rounding moves a normal number by at most 1/16 of itself
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # below 2^-6 the spacing is fixed, in units of the scale


def within_e4m3(approx: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | float) -> bool:
    bound = E4M3_RELATIVE_STEP * exact.abs() + E4M3_SUBNORMAL_STEP * scale + 1e-7
    return bool(((approx - exact).abs() <= bound).all())


def test_per_row_quantisation_round_trips_within_e4m3_precision():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 8)[:, None]
    x[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(8) != 3], torch.full((7,), FP8_MAX))
    assert within_e4m3(dequantize_rows(q, scale), x, scale)


def test_fp8_linear_is_the_product_of_the_dequantised_operands():
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    wq, w_scale = quantize_rows(w)
    xq, x_scale = quantize_rows(x)
    want = dequantize_rows(xq, x_scale) @ dequantize_rows(wq, w_scale).t() + bias
    got = fp8_linear(x, wq, w_scale, bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - (x @ w.t() + bias)).abs().max() < 0.1 * (x @ w.t()).abs().max()  # and near the exact product


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-fp8"), vocab_size=512)


def _prefill_logits(model, config, prompt, kv_dtype=torch.float32):
    (logits,) = PagedDriver(model, config, dtype=kv_dtype).step([(0, prompt)])
    return logits


def test_quantization_fp8_makes_fp8_linear_layers_that_stay_close(qwen3):
    reference, config = load_model(qwen3, dtype=torch.float32)
    model, _ = load_model(qwen3, dtype=torch.float32, quantization="fp8")
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE and layer.mlp.down_proj.weight.dtype == FP8_DTYPE
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and LM head stay
    prompt = random_prompt(40, seed=1)
    want, got = _prefill_logits(reference, config, prompt), _prefill_logits(model, config, prompt)
    assert (got - want).abs().max() < 0.2 * want.abs().max()


def _block_quantise(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint format of Qwen3 FP8 releases, written independently of the code under test."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(w.shape, dtype=FP8_DTYPE)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / FP8_MAX
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(FP8_DTYPE)
    return q, scale


@pytest.mark.parametrize("checkpoint_format", ["fp8-block", "compressed-tensors"])
def test_fp8_checkpoints_load(checkpoint_format, qwen3, tmp_path):
    tensors = load_file(qwen3 / "model.safetensors")
    fp8_tensors, dequantised = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            if checkpoint_format == "fp8-block":
                q, scale = _block_quantise(tensor, 32)
                fp8_tensors[name.replace(".weight", ".weight_scale_inv")] = scale
                dequantised[name] = q.float() * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
            else:
                scale = tensor.abs().amax(dim=1, keepdim=True) / FP8_MAX
                q = (tensor / scale).to(FP8_DTYPE)
                fp8_tensors[name.replace(".weight", ".weight_scale")] = scale
                fp8_tensors[name.replace(".weight", ".input_scale")] = torch.ones(1)  # static: ignored
                dequantised[name] = q.float() * scale
            fp8_tensors[name] = q
        else:
            fp8_tensors[name] = tensor
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(fp8_tensors, folder / "model.safetensors")
    hf_config = json.loads((qwen3 / "config.json").read_text())
    hf_config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
        if checkpoint_format == "fp8-block" else
        {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}})
    (folder / "config.json").write_text(json.dumps(hf_config))

    plain, _ = load_model(folder, dtype=torch.float32, quantization="none")
    torch.testing.assert_close(plain.model.layers[1].mlp.down_proj.weight,
                               dequantised["model.layers.1.mlp.down_proj.weight"])
    q_proj = plain.model.layers[0].self_attn.qkv_proj.weight[:hf_config["num_attention_heads"] * 16]
    torch.testing.assert_close(q_proj, dequantised["model.layers.0.self_attn.q_proj.weight"])
    served, _ = load_model(folder, dtype=torch.float32)  # auto: an FP8 checkpoint serves in FP8
    assert served.model.layers[0].mlp.gate_up_proj.weight.dtype == FP8_DTYPE


def test_unsupported_quantizations_are_refused_naming_the_supported_ones(qwen3, tmp_path):
    with pytest.raises(ValueError, match="unsupported --quantization 'int4'; supported: auto, none, fp8"):
        DataPlaneConfig(model=str(qwen3), quantization="int4").validate()
    with pytest.raises(ValueError, match="unsupported --kv-cache-dtype 'int8'; supported: auto, fp8"):
        DataPlaneConfig(model=str(qwen3), kv_cache_dtype="int8").validate()
    with pytest.raises(ValueError, match="unsupported checkpoint quantization 'awq'; supported: fp8"):
        resolve_quantization("auto", {"quant_method": "awq", "bits": 4})
    assert fp8_supported(torch.device("cpu")) is None
    assert "FP8 needs a CUDA GPU" in fp8_supported(torch.device("meta"))


def test_fp8_kv_cache_holds_k_and_v_within_e4m3_precision_and_logits_stay_close(qwen3):
    model, config = load_model(qwen3, dtype=torch.float32)
    first = next(m for m in model.modules() if isinstance(m, Attention))
    prompt = random_prompt(40, seed=2)  # three blocks, the last one partly filled
    exact = PagedDriver(model, config)  # the same seed hands out the same blocks below
    want = torch.cat([exact.step([(0, prompt[:25])])[0], exact.step([(0, prompt[25:])])[0]])
    exact_k, exact_v = first.k_cache.clone(), first.v_cache.clone()
    scales = calibrate_kv_scales(model, config.vocab_size, torch.device("cpu"), torch.float32)
    assert all(0 < k < 1 and 0 < v < 1 for k, v in scales)
    fp8 = PagedDriver(model, config, dtype=FP8_KV_DTYPE)
    got = torch.cat([fp8.step([(0, prompt[:25])])[0], fp8.step([(0, prompt[25:])])[0]])  # the second reads the first
    assert first.k_cache.dtype == FP8_KV_DTYPE
    # the first layer's K/V do not depend on the cache (later layers' do, through attention)
    assert within_e4m3(first.k_cache.float() * first.k_scale, exact_k, first.k_scale)
    assert within_e4m3(first.v_cache.float() * first.v_scale, exact_v, first.v_scale)
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [7, 1, 20]], ids=["decode", "mixed"])
def test_triton_attention_reads_an_fp8_cache_as_the_reference_does(q_lens):
    """The decode and prefill kernels upcast FP8 tiles (under the interpreter here; compiled on a GPU)."""
    from tests.triton_interpreter import HAS_CUDA, interpreter_numpy_compat, kernel_module, use_interpreter_without_cuda
    use_interpreter_without_cuda()
    pytest.importorskip("triton", reason="triton is not installed")
    from dataplane.attention import reference
    from dataplane.context import AttentionMetadata
    if not HAS_CUDA:
        interpreter_numpy_compat()
    backend = kernel_module("dataplane.attention.triton_decode"), kernel_module("dataplane.attention.triton_prefill")
    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(3)
    block_size, num_blocks, heads, kv_heads, head_dim = 16, 12, 4, 2, 32
    seq_lens = [40, 17, 33]
    k_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 8).to(FP8_KV_DTYPE).to(device)
    v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 8).to(FP8_KV_DTYPE).to(device)
    tables = torch.randperm(num_blocks, generator=g)[:9].view(3, 3).to(torch.int32).to(device)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(device)
    query_start_loc = [0]
    for n in q_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.05)
    decode, prefill = backend
    got = torch.empty_like(q)
    if max(q_lens) == 1:
        decode.paged_decode(q, k_cache, v_cache, tables, meta.seq_lens, max(seq_lens), 0.05, out=got)
    else:
        prefill.paged_prefill(q, k_cache, v_cache, tables, meta.query_start_loc, meta.seq_lens, 0.05, out=got)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
