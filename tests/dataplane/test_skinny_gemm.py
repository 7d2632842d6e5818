"""The decode-sized Triton GEMM (dataplane/layers/skinny_gemm.py) against F.linear in fp32.

Without CUDA the kernel runs under the Triton interpreter on tiny fp32 shapes (Triton 3.6's
interpreter computes tl.dot of bf16 tiles wrongly, so bf16 is covered by the `gpu` tests):
M in {1, 3, 17}, with and without bias, K not a multiple of BLOCK_K, split-K slices that do
not divide K evenly. The `gpu` tests run Qwen3-0.6B's, Llama-3-8B's and the LM head's shapes
in bf16 at M from 1 to 256, the dispatch from linear.py, and a CUDA-graph capture.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the skinny GEMM cannot run here")

from dataplane.layers.linear import ReplicatedLinear

skinny_gemm = kernel_module("dataplane.layers.skinny_gemm")
GemmConfig = skinny_gemm.GemmConfig
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (N, K) of the matmuls the model runs (benchmarks/gemm_shapes.py times the same list)
QWEN3_0_6B = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
LLAMA_3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
LM_HEAD = [(151936, 1024)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was left unwritten"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


def reference(x, w, b) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.skipif(HAS_CUDA, reason="fp32 tl.dot is tf32 on the GPU; the gpu tests cover bf16 there")
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n, k, config", [
    (40, 72, GemmConfig(16, 16, 32, 1)),   # K % BLOCK_K != 0, N % BLOCK_N != 0
    (64, 96, GemmConfig(16, 32, 16, 4)),   # 6 K blocks, 4 slices asked: 3 even slices of 2
    (48, 80, GemmConfig(16, 16, 16, 2)),   # 5 K blocks over 2 slices: 3 and 2
])
def test_matches_f_linear_under_interpreter(m, bias, n, k, config):
    x, w, b = operands(m, n, k, torch.float32, bias)
    out = skinny_gemm.skinny_linear(x, w, b, config=config)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, reference(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU case of the default config; the gpu tests cover CUDA")
def test_default_config_and_leading_dims():
    x, w, b = operands(6, 32, 64, torch.float32, bias=True)
    out = skinny_gemm.skinny_linear(x.view(2, 3, 64), w, b)
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out.view(6, 32), reference(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, k", QWEN3_0_6B + LLAMA_3_8B + LM_HEAD)
@pytest.mark.parametrize("m", [1, 8, 32, 64, 128, 256])
def test_config_fills_the_sms_without_short_slices(m, n, k):
    num_sms = 132
    config = skinny_gemm.pick_config(m, n, k, num_sms)
    tiles = -(-n // config.block_n) * -(-m // config.block_m)
    assert config.block_m >= 16 and config.block_m >= min(m, 64)
    assert tiles * config.split_k <= max(tiles, 2 * num_sms)
    if config.split_k > 1:
        assert -(-k // (config.block_k * config.split_k)) >= skinny_gemm.MIN_SLICE_STEPS, "a K slice too short"


def test_cpu_matmul_stays_f_linear():
    x, w, _ = operands(3, 16, 32, torch.float32, bias=False)
    assert not skinny_gemm.use_for(x.cpu(), w.cpu())


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("n, k", QWEN3_0_6B + LLAMA_3_8B + LM_HEAD)
@pytest.mark.parametrize("m", [1, 8, 32, 64, 128, 256])
def test_real_shapes_bf16(m, n, k):
    x, w, b = operands(m, n, k, torch.bfloat16, bias=(n == 4096))
    out = skinny_gemm.skinny_linear(x, w, b)
    assert rel_err(out, reference(x, w, b)) < 1e-2


@gpu
@pytest.mark.parametrize("m", [1, 5, 33, 250])
def test_odd_m_and_fp16(m):
    x, w, b = operands(m, 1024, 3072, torch.float16, bias=True)
    assert rel_err(skinny_gemm.skinny_linear(x, w, b), reference(x, w, b)) < 1e-2


@gpu
def test_linear_layer_dispatch(monkeypatch):
    monkeypatch.setattr(skinny_gemm, "MAX_M", 256)  # off by default (skinny_gemm.py says why)
    layer = ReplicatedLinear(1024, 4096, bias=True).to(DEVICE, torch.bfloat16)
    x, w, b = operands(8, 4096, 1024, torch.bfloat16, bias=True)
    layer.weight.copy_(w)
    layer.bias.copy_(b)
    assert skinny_gemm.use_for(x, layer.weight)
    assert not skinny_gemm.use_for(torch.cat([x] * (skinny_gemm.MAX_M // 8 + 1)), layer.weight)
    torch.testing.assert_close(layer(x), skinny_gemm.skinny_linear(x, w, b), rtol=0, atol=0)
    monkeypatch.setenv("NANOPLANE_DISABLE_FUSED_OPS", "1")
    assert not skinny_gemm.use_for(x, layer.weight)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("n, k", [(1024, 3072), (6144, 1024)])  # split-K and not
def test_cuda_graph_replay(n, k):
    x, w, b = operands(4, n, k, torch.bfloat16, bias=False)
    skinny_gemm.skinny_linear(x, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_gemm.skinny_linear(x, w)
    x.copy_(operands(4, n, k, torch.bfloat16, bias=False, seed=1)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, w, b)) < 1e-2
