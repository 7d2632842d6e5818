"""Triton fused ops (dataplane/layers/fused_ops.py) against the layers' torch code.

The torch path of RMSNorm, RotaryEmbedding and SiluAndMul is the reference: on CPU it is
the only path, on CUDA NANOPLANE_DISABLE_FUSED_OPS=1 forces it. On a machine without CUDA
the kernels run under the Triton interpreter on small fp32 shapes; the `gpu` tests cover
Qwen3-0.6B's shapes (hidden 1024, 16/8 heads of 128) and tiny models' (heads of 16 and 64),
1 to 8192 tokens, fp32 and bf16, and a CUDA-graph capture. Outputs are poisoned with NaN
before every kernel run, so an unwritten element fails.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused ops cannot run here")

from dataplane.layers import activation, layernorm, rotary
from dataplane.layers.activation import SiluAndMul
from dataplane.layers.layernorm import RMSNorm
from dataplane.layers.rotary import RotaryEmbedding


fused_ops = kernel_module("dataplane.layers.fused_ops")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def torch_path(monkeypatch):
    """Forces the layers' torch code while the test runs (it is the only path on CPU anyway)."""
    monkeypatch.setenv(fused_ops.DISABLE_ENV, "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was left unwritten"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5


def nan_like(x: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.full(x.shape if shape is None else shape, float("nan"), dtype=dtype or x.dtype, device=x.device)


def randn(gen: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def make_norm(size: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(size, eps=1e-6).to(device=DEVICE, dtype=dtype)
    norm.weight.copy_(1.0 + 0.5 * torch.randn(size, generator=gen))
    return norm


# ---------------------------------------------------------------- checks shared by CPU and GPU

def check_rms_norm(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    norm = make_norm(hidden, dtype, gen)
    x = randn(gen, num_tokens, hidden, dtype=dtype, scale=3.0)
    residual = randn(gen, num_tokens, hidden, dtype=dtype)
    os.environ[fused_ops.DISABLE_ENV] = "1"
    try:
        ref = norm(x)
        ref_out, ref_residual = norm(x, residual)
    finally:
        del os.environ[fused_ops.DISABLE_ENV]
    out = fused_ops.rms_norm(x, norm.weight, norm.eps, out=nan_like(ref))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tolerance(dtype)
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps, out=nan_like(ref_out),
                                                     residual_out=nan_like(ref_residual))
    assert new_residual.dtype == ref_residual.dtype and out.dtype == ref_out.dtype
    assert rel_err(out, ref_out) < tolerance(dtype)
    assert rel_err(new_residual, ref_residual) < tolerance(dtype)
    if dtype == torch.float32:
        assert torch.equal(new_residual, ref_residual)  # one fp32 add either way


def check_head_norm(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    seed: int = 0):
    """Qwen3's q_norm/k_norm: per-head RMSNorm of the q and k slices of the fused qkv output (strided views)."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    for x, heads in ((q, num_heads), (k, num_kv_heads)):
        norm = make_norm(head_dim, dtype, gen)
        rows = x.reshape(-1, heads, head_dim)
        os.environ[fused_ops.DISABLE_ENV] = "1"
        try:
            ref = norm(rows)
        finally:
            del os.environ[fused_ops.DISABLE_ENV]
        out = fused_ops.rms_norm(rows, norm.weight, norm.eps, out=nan_like(ref))
        assert rel_err(out, ref) < tolerance(dtype)
        assert out.view(-1, heads * head_dim).shape == x.shape


def check_rotary(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int = 0, max_position: int = 4096, rope_scaling: dict | None = None):
    gen = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(head_dim, head_dim, max_position, 1e6, rope_scaling).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided, as the attention layer passes them
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(DEVICE)
    os.environ[fused_ops.DISABLE_ENV] = "1"
    try:
        q_ref, k_ref = rope(positions, q, k)
    finally:
        del os.environ[fused_ops.DISABLE_ENV]
    q_out, k_out = fused_ops.apply_rotary(positions, q, k, rope.cos_sin_cache, head_dim,
                                          q_out=nan_like(q_ref), k_out=nan_like(k_ref))
    assert q_out.dtype == q_ref.dtype and k_out.dtype == k_ref.dtype
    assert rel_err(q_out, q_ref) < tolerance(dtype) and rel_err(k_out, k_ref) < tolerance(dtype)


def check_silu_and_mul(num_tokens: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, num_tokens, 2 * intermediate, dtype=dtype, scale=3.0)
    os.environ[fused_ops.DISABLE_ENV] = "1"
    try:
        ref = SiluAndMul()(x)
    finally:
        del os.environ[fused_ops.DISABLE_ENV]
    out = fused_ops.silu_and_mul(x, out=nan_like(ref))
    assert out.dtype == ref.dtype and rel_err(out, ref) < tolerance(dtype)


# ---------------------------------------------------------------- CPU: the interpreter, small shapes

@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (5, 64), (3, 48), (17, 256)])
def test_rms_norm_small(num_tokens, hidden):
    check_rms_norm(num_tokens, hidden, torch.float32, seed=num_tokens)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (2, 1, 64), (3, 3, 24)])
def test_head_norm_small(num_heads, num_kv_heads, head_dim):
    check_head_norm(7, num_heads, num_kv_heads, head_dim, torch.float32, seed=head_dim)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (2, 1, 64), (3, 3, 24)])
def test_rotary_small(num_heads, num_kv_heads, head_dim):
    check_rotary(9, num_heads, num_kv_heads, head_dim, torch.float32, seed=head_dim, max_position=64)


def test_rotary_llama3_scaling_small():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    check_rotary(6, 4, 2, 16, torch.float32, max_position=128, rope_scaling=scaling)


@pytest.mark.parametrize("num_tokens,intermediate", [(1, 128), (6, 128), (3, 40)])
def test_silu_and_mul_small(num_tokens, intermediate):
    check_silu_and_mul(num_tokens, intermediate, torch.float32, seed=num_tokens)


def test_empty_batch():
    x = torch.zeros(0, 32, device=DEVICE)
    weight = torch.ones(32, device=DEVICE)
    assert fused_ops.rms_norm(x, weight, 1e-6).shape == (0, 32)
    assert fused_ops.fused_add_rms_norm(x, x, weight, 1e-6)[1].shape == (0, 32)
    assert fused_ops.silu_and_mul(x).shape == (0, 16)
    cache = torch.zeros(8, 16, device=DEVICE)
    q, k = fused_ops.apply_rotary(torch.zeros(0, dtype=torch.long, device=DEVICE), x, x[:, :16], cache, 16)
    assert q.shape == (0, 32) and k.shape == (0, 16)


def test_layers_dispatch_to_fused_ops(monkeypatch):
    """With the gate open (it opens for CUDA tensors only), each layer returns the kernel's result."""
    monkeypatch.setattr(fused_ops, "enabled_for", lambda x: True)
    for module in (layernorm, rotary, activation):
        monkeypatch.setattr(module, "fused_ops", fused_ops)
    calls = []
    for name in ("rms_norm", "fused_add_rms_norm", "apply_rotary", "silu_and_mul"):
        kernel = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    norm = make_norm(32, torch.float32, gen)
    x, residual = randn(gen, 3, 32), randn(gen, 3, 32)
    norm(x, residual)
    rope = RotaryEmbedding(16, 16, 32, 1e4).to(DEVICE)
    rope(torch.tensor([0, 5, 31], device=DEVICE), norm(x), x[:, :16])
    SiluAndMul()(x)
    assert calls == ["fused_add_rms_norm", "rms_norm", "apply_rotary", "silu_and_mul"]


def test_gate_closed_on_cpu_and_by_env(monkeypatch):
    assert not fused_ops.enabled_for(torch.zeros(1))
    for module in (layernorm, rotary, activation):
        assert module.fused_ops is not None  # triton imports here, so the layers see the kernels
    if HAS_CUDA:
        assert fused_ops.enabled_for(torch.zeros(1, device="cuda"))
        monkeypatch.setenv(fused_ops.DISABLE_ENV, "1")
        assert not fused_ops.enabled_for(torch.zeros(1, device="cuda"))


# ---------------------------------------------------------------- GPU: model shapes, fp32 and bf16

DTYPES = [torch.float32, torch.bfloat16]
TOKENS = [1, 7, 256, 8192]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [64, 1024])
def test_gpu_rms_norm(dtype, num_tokens, hidden):
    check_rms_norm(num_tokens, hidden, dtype, seed=num_tokens + hidden)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (4, 2, 16), (8, 2, 64)])
def test_gpu_head_norm_and_rotary(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    check_head_norm(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens)
    check_rotary(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens, max_position=40960)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("intermediate", [128, 3072])
def test_gpu_silu_and_mul(dtype, num_tokens, intermediate):
    check_silu_and_mul(num_tokens, intermediate, dtype, seed=num_tokens)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_matches_torch_rounding():
    """The kernels round where the torch code rounds: bf16 results agree to within one ulp nearly everywhere."""
    gen = torch.Generator().manual_seed(1)
    norm = make_norm(1024, torch.bfloat16, gen)
    x, residual = randn(gen, 256, 1024, dtype=torch.bfloat16), randn(gen, 256, 1024, dtype=torch.bfloat16)
    out, new_residual = norm(x, residual)
    os.environ[fused_ops.DISABLE_ENV] = "1"
    try:
        ref_out, ref_residual = norm(x, residual)
    finally:
        del os.environ[fused_ops.DISABLE_ENV]
    assert torch.equal(new_residual, ref_residual)
    assert (out != ref_out).float().mean().item() < 0.01


@gpu
@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """A decoder-layer-like sequence of the fused ops, captured in a CUDA graph and replayed on new inputs."""
    gen = torch.Generator().manual_seed(2)
    dtype, tokens, heads, kv_heads, head_dim, hidden = torch.bfloat16, 64, 16, 8, 128, 1024
    norm = make_norm(hidden, dtype, gen)
    q_norm, k_norm = make_norm(head_dim, dtype, gen), make_norm(head_dim, dtype, gen)
    rope = RotaryEmbedding(head_dim, head_dim, 4096, 1e6).to(DEVICE)
    act = SiluAndMul()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    hidden_in = randn(gen, tokens, hidden, dtype=dtype)
    residual_in = randn(gen, tokens, hidden, dtype=dtype)
    qkv_in = randn(gen, tokens, q_size + 2 * kv_size, dtype=dtype)
    gate_up_in = randn(gen, tokens, 2 * 3072, dtype=dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)

    def step():
        h, r = norm(hidden_in, residual_in)
        q, k, _ = qkv_in.split([q_size, kv_size, kv_size], dim=-1)
        q = q_norm(q.reshape(-1, heads, head_dim)).view(-1, q_size)
        k = k_norm(k.reshape(-1, kv_heads, head_dim)).view(-1, kv_size)
        q, k = rope(positions, q, k)
        return h, r, q, k, act(gate_up_in)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (hidden_in, residual_in, qkv_in, gate_up_in):
        t.copy_(torch.randn(t.shape, generator=gen).to(t))
    positions.copy_(torch.randint(0, 4096, (tokens,), generator=gen))
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for out, ref in zip(outs, expected):
        assert torch.equal(out, ref)
