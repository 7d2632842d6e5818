"""The fused q/k-norm + rotary + KV-store kernel (dataplane/layers/fused_qkv.py) against the unfused torch path.

The reference is what the attention layer does without the kernel: RMSNorm per head, RotaryEmbedding
and the reference attention's store_kv (through kv_fp8.quantize_kv for an FP8 cache), all in their
torch code. Caches start filled with a sentinel that must survive in every slot outside slot_mapping
(padding tokens, slot -1, store nothing). On CPU the kernel runs under the
Triton interpreter on tiny shapes; the `gpu` tests take Qwen3-0.6B's heads (16/8 of 128) and decode
through the runner's path with the fusion on and off (NANOPLANE_DISABLE_FUSED_OPS).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, interpreter_numpy_compat, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run here")

from dataplane.attention import reference  # noqa: E402
from dataplane.kv_fp8 import FP8_KV_DTYPE, quantize_kv  # noqa: E402
from dataplane.layers.layernorm import RMSNorm  # noqa: E402
from dataplane.layers.rotary import RotaryEmbedding  # noqa: E402

if not HAS_CUDA:
    interpreter_numpy_compat()  # the decode attention kernel's loops, in the model tests

fused_qkv = kernel_module("dataplane.layers.fused_qkv")
fused_ops = kernel_module("dataplane.layers.fused_ops")
DEVICE = "cuda" if HAS_CUDA else "cpu"
SENTINEL = 3.0  # in every cache element before a store; exact in fp32, bf16 and e4m3


def make_norm(size: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(size, eps=1e-6).to(device=DEVICE, dtype=dtype)
    norm.weight.copy_(1.0 + 0.5 * torch.randn(size, generator=gen))
    return norm


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def torch_reference(qkv, positions, rope, q_norm, k_norm, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                    head_dim, k_scale, v_scale):
    """The unfused path of LlamaAttention + Attention.forward, in the layers' torch code."""
    os.environ[fused_ops.DISABLE_ENV] = "1"
    try:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if q_norm is not None:
            q = q_norm(q.reshape(-1, num_heads, head_dim)).view(-1, q_size)
            k = k_norm(k.reshape(-1, num_kv_heads, head_dim)).view(-1, kv_size)
        q, k = rope(positions, q, k)
        k, v = k.reshape(-1, num_kv_heads, head_dim), v.reshape(-1, num_kv_heads, head_dim)
        if k_cache.dtype == FP8_KV_DTYPE:
            reference.store_kv(quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8),
                               k_cache.view(torch.uint8), v_cache.view(torch.uint8), slot_mapping)
        else:
            reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q
    finally:
        del os.environ[fused_ops.DISABLE_ENV]


def check_norm_rope_store(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          qk_norm: bool, fp8: bool = False, block_size: int = 4, num_blocks: int = 8,
                          max_position: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(DEVICE)
    # distinct slots in scattered blocks, every third token padding (the first stores, so one token does too)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[2::3] = -1
    slot_mapping = slots.to(DEVICE)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slot_mapping[slot_mapping >= 0]] = True
    rope = RotaryEmbedding(head_dim, head_dim, max_position, 1e6).to(DEVICE)
    q_norm = make_norm(head_dim, dtype, gen) if qk_norm else None
    k_norm = make_norm(head_dim, dtype, gen) if qk_norm else None
    k_scale, v_scale = (0.05, 0.03) if fp8 else (1.0, 1.0)
    cache_dtype = FP8_KV_DTYPE if fp8 else dtype
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    ref_k, ref_v = (torch.full(shape, SENTINEL, device=DEVICE).to(cache_dtype) for _ in range(2))
    out_k, out_v = ref_k.clone(), ref_v.clone()

    q_ref = torch_reference(qkv, positions, rope, q_norm, k_norm, ref_k, ref_v, slot_mapping, num_heads,
                            num_kv_heads, head_dim, k_scale, v_scale)
    q_out = torch.full((num_tokens, q_size), float("nan"), dtype=dtype, device=DEVICE)
    q = fused_qkv.norm_rope_store(
        qkv, positions, rope.cos_sin_cache, out_k, out_v, slot_mapping, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, q_norm_weight=q_norm.weight if qk_norm else None,
        k_norm_weight=k_norm.weight if qk_norm else None, eps=1e-6, k_scale=k_scale, v_scale=v_scale, q_out=q_out)

    assert q is q_out and torch.isfinite(q).all(), "q has NaN: a row was left unwritten"
    # bf16 on CPU: the interpreter's float-to-bf16 casts truncate (the GPU's round to nearest), three casts deep
    tolerance = 1e-5 if dtype == torch.float32 else (1e-2 if HAS_CUDA else 3e-2)
    assert rel_err(q, q_ref) < tolerance
    for out, ref in ((out_k, ref_k), (out_v, ref_v)):
        assert (out.float().view(num_blocks * block_size, -1)[~written] == SENTINEL).all(), \
            "a slot outside slot_mapping (or a padding token's) changed"
        if fp8 and HAS_CUDA:  # one e4m3 step apart at most, where fp32 rounding put an input on the other side of a tie
            assert (out.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs().max() <= 1
            assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean() < 0.02
        elif fp8:  # the interpreter's float-to-e4m3 cast rounds ties away and drops the carry into the exponent
            assert rel_err(out.float(), ref.float()) < 0.15  # the exact check is the GPU test's
            assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean() < 0.1
        else:
            assert rel_err(out, ref) < tolerance
    assert (out_v.float().view(num_blocks * block_size, -1)[written] != SENTINEL).any(), "nothing was stored"


# ---------------------------------------------------------------- CPU: the interpreter, tiny shapes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_norm_rope_store_small(dtype, qk_norm):
    check_norm_rope_store(7, 4, 2, 16, dtype, qk_norm, seed=int(qk_norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_store_fp8_cache_small(dtype):
    check_norm_rope_store(7, 4, 2, 16, dtype, qk_norm=True, fp8=True, seed=4)


def test_norm_rope_store_odd_heads():
    """Head counts that are not powers of two (masked lanes) and a head_dim of 24."""
    check_norm_rope_store(5, 3, 3, 24, torch.float32, qk_norm=True, seed=3)


def test_norm_rope_store_empty_batch():
    qkv = torch.zeros(0, 64, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    no_tokens = torch.zeros(0, dtype=torch.long, device=DEVICE)
    q = fused_qkv.norm_rope_store(qkv, no_tokens, torch.zeros(8, 16, device=DEVICE), cache, cache.clone(), no_tokens,
                                  num_heads=2, num_kv_heads=1, head_dim=16)
    assert q.shape == (0, 32)


# ---------------------------------------------------------------- GPU: Qwen3-0.6B's heads

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_gpu_norm_rope_store_qwen3_shapes(dtype, qk_norm, num_tokens):
    check_norm_rope_store(num_tokens, 16, 8, 128, dtype, qk_norm, block_size=16, num_blocks=256,
                          max_position=40960, seed=num_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256])
def test_gpu_norm_rope_store_qwen3_shapes_fp8(num_tokens):
    check_norm_rope_store(num_tokens, 16, 8, 128, torch.bfloat16, qk_norm=True, fp8=True, block_size=16,
                          num_blocks=64, max_position=40960, seed=num_tokens)


# ---------------------------------------------------------------- the model with the fusion on and off

from dataplane.layers import attention as attention_layer  # noqa: E402
from dataplane.layers.attention import Attention, get_selected_backend, set_attention_backend  # noqa: E402
from dataplane.loader import load_model  # noqa: E402
from tests.dataplane.test_models_parity import PagedDriver, random_prompt  # noqa: E402
from tests.kernel_launches import count_launches  # noqa: E402
from tests.tiny_models import save_tiny_model  # noqa: E402

VOCAB = 256


@pytest.fixture
def gate_open_on_cpu(monkeypatch):
    """The fused paths for CPU tensors too (the gate opens for CUDA only), still closed by the env switch."""
    if not HAS_CUDA:
        monkeypatch.setattr(fused_ops, "enabled_for",
                            lambda x: os.environ.get(fused_ops.DISABLE_ENV, "") in ("", "0"))
    from dataplane.layers import activation, layernorm, rotary
    for module in (layernorm, rotary, activation, attention_layer):
        monkeypatch.setattr(module, "fused_ops", fused_ops)
    monkeypatch.setattr(attention_layer, "fused_qkv", fused_qkv)
    previous = get_selected_backend().name
    set_attention_backend("triton")
    yield
    set_attention_backend(previous)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param), vocab_size=VOCAB)
    model, config = load_model(path, dtype=torch.float32, device=DEVICE)
    return request.param, model, config


def greedy(model, config, num_new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Two prompts prefilled together, then num_new - 1 batched decode steps -> (tokens, last logits per step)."""
    driver = PagedDriver(model, config, num_blocks=8, device=DEVICE)
    prompts = [[t % VOCAB for t in random_prompt(length, seed=length)] for length in (11, 6)]
    chunks = list(enumerate(prompts))
    tokens, logits = [[], []], []
    for _ in range(num_new):
        step_logits = driver.step(chunks)
        logits.append(torch.stack([chunk[-1] for chunk in step_logits]))
        for seq, chunk in enumerate(step_logits):
            tokens[seq].append(int(chunk[-1].argmax()))
        chunks = [(seq, tokens[seq][-1:]) for seq in range(2)]
    return tokens, logits


def test_greedy_tokens_equal_with_fusion_on_and_off(tiny, gate_open_on_cpu, monkeypatch):
    _, model, config = tiny
    fused_tokens, fused_logits = greedy(model, config, num_new=3)
    monkeypatch.setenv(fused_ops.DISABLE_ENV, "1")
    unfused_tokens, unfused_logits = greedy(model, config, num_new=3)
    assert fused_tokens == unfused_tokens
    for fused, unfused in zip(fused_logits, unfused_logits):
        torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)


def test_a_decode_layer_launches_fewer_kernels(tiny, gate_open_on_cpu):
    """Qwen3's q norm, k norm, rotary and KV store become one launch; Llama's rotary and store."""
    arch, model, config = tiny
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    driver = PagedDriver(model, config, num_blocks=8, device=DEVICE)
    driver.step([(0, [5, 6, 7]), (1, [8, 9])])
    counts = {}
    for fuse in (True, False):
        for layer in layers:
            layer.fuse_qkv = fuse
        with count_launches() as names:
            driver.step([(0, [10]), (1, [11])])
        counts[fuse] = names
    for layer in layers:
        layer.fuse_qkv = True
    per_layer_saved = 3 if arch == "qwen3" else 1
    assert len(counts[False]) - len(counts[True]) == per_layer_saved * len(layers), (counts[True], counts[False])
    assert counts[True].count("triton.norm_rope_store_kernel") == len(layers)
    assert "triton.store_kvcache_kernel" not in counts[True] and "triton.rotary_kernel" not in counts[True]
    assert counts[False].count("triton.store_kvcache_kernel") == len(layers)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,switch", [(torch.float32, "env"), (torch.bfloat16, "layer flag")])
def test_gpu_decode_graph_tokens_equal_with_fusion_on_and_off(tmp_path, dtype, switch, monkeypatch):
    """Qwen3-0.6B's layer shapes (hidden 1024, 16/8 heads of 128) in two layers, prefilled eagerly and decoded
    through captured CUDA graphs (DecodeGraphs), with the fusion on and then off: the same greedy tokens. Off is
    NANOPLANE_DISABLE_FUSED_OPS=1 (every fused op off) in fp32; in bf16 only this kernel is switched off
    (Attention.fuse_qkv), since the other fused ops round a little differently from their torch code."""
    from dataplane.cuda_graphs import DecodeGraphs

    path = save_tiny_model("qwen3", tmp_path, vocab_size=1024, hidden_size=1024, intermediate_size=3072,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    num_seqs, num_blocks, num_new = 3, 24, 12
    prompts = [random_prompt(37 + 5 * s, seed=s) for s in range(num_seqs)]
    previous = get_selected_backend().name
    set_attention_backend("triton")
    try:
        runs = []
        for fused in (True, False):
            monkeypatch.setenv(fused_ops.DISABLE_ENV, "0" if fused or switch != "env" else "1")
            model, config = load_model(path, dtype=dtype, device="cuda")
            for layer in model.modules():
                if isinstance(layer, Attention):
                    layer.fuse_qkv = fused or switch == "env"
            driver = PagedDriver(model, config, num_blocks=num_blocks, dtype=dtype, device="cuda")  # binds the cache
            graphs = DecodeGraphs(model, 4, num_blocks, num_blocks * 16, torch.device("cuda"))
            graphs.capture()
            tokens = [[int(chunk[-1].argmax())] for chunk in driver.step(list(enumerate(prompts)))]
            with torch.inference_mode():
                for _ in range(num_new):
                    meta, ids, positions = driver.inputs([(s, tokens[s][-1:]) for s in range(num_seqs)])
                    for s, row in enumerate(model.compute_logits(graphs.run(ids, positions, meta))):
                        tokens[s].append(int(row.argmax()))
            graphs.release()
            runs.append(tokens)
        assert runs[0] == runs[1]
    finally:
        set_attention_backend(previous)
