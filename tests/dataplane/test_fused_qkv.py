"""The fused q/k-norm + rotary + KV-store kernel (dataplane/layers/fused_qkv.py) against the unfused torch path.

The reference is what the attention layer does without the kernel: RMSNorm per head, RotaryEmbedding
and the reference attention's store_kv (through kv_fp8.quantize_kv for an FP8 cache), all in their
torch code. Caches start filled with a sentinel, so a store to a wrong slot, or to the slot of a
padding token (-1), changes bytes the reference leaves alone. On CPU the kernel runs under the
Triton interpreter on tiny shapes; the `gpu` tests take Qwen3-0.6B's heads (16/8 of 128) and decode
through the runner's path with the fusion on and off (NANOPLANE_DISABLE_FUSED_OPS).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run here")

from dataplane.attention import reference  # noqa: E402
from dataplane.kv_fp8 import FP8_KV_DTYPE, quantize_kv  # noqa: E402
from dataplane.layers.layernorm import RMSNorm  # noqa: E402
from dataplane.layers.rotary import RotaryEmbedding  # noqa: E402

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
    # distinct slots in scattered blocks, every third token padding
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    slot_mapping = slots.to(DEVICE)
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
        untouched = ref.float() == SENTINEL
        assert torch.equal(out.float()[untouched], ref.float()[untouched]), "a slot outside slot_mapping changed"
        if fp8 and HAS_CUDA:  # one e4m3 step apart at most, where fp32 rounding put an input on the other side of a tie
            assert (out.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs().max() <= 1
            assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean() < 0.02
        elif fp8:  # the interpreter's float-to-e4m3 cast rounds ties away and drops the carry into the exponent
            assert rel_err(out.float(), ref.float()) < 0.1
            assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean() < 0.1
        else:
            assert rel_err(out, ref) < tolerance
    assert (out_v.float() != SENTINEL).any(), "nothing was stored"


# ---------------------------------------------------------------- CPU: the interpreter, tiny shapes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_norm_rope_store_small(dtype, qk_norm):
    check_norm_rope_store(7, 4, 2, 16, dtype, qk_norm, seed=int(qk_norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_store_fp8_cache_small(dtype):
    check_norm_rope_store(7, 4, 2, 16, dtype, qk_norm=True, fp8=True, seed=2)


def test_norm_rope_store_odd_heads():
    """Head counts that are not powers of two (masked lanes) and a head_dim of 24."""
    check_norm_rope_store(5, 3, 3, 24, torch.float32, qk_norm=True, seed=3)


def test_norm_rope_store_empty_batch():
    qkv = torch.zeros(0, 64, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    q = fused_qkv.norm_rope_store(qkv, torch.zeros(0, dtype=torch.long, device=DEVICE), torch.zeros(8, 16, device=DEVICE),
                                  cache, cache.clone(), torch.zeros(0, dtype=torch.long, device=DEVICE),
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
