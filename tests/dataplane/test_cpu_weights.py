"""--cpu-weights: the int4 packing convention, int8, the conversion of linear layers, and the flag's resolution."""
import pytest
import torch

from dataplane.cpu_weights import (convert_linear_layers, dequantize_int4, int4_linear, int8_linear, quantize_int4,
                                   quantize_int8, resolve_cpu_weights)
from dataplane.layers.linear import ReplicatedLinear


def test_q4_1_like_weights_give_back_their_codes():
    torch.manual_seed(0)
    n, k = 8, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    codes[:, ::32] = 0  # every Q4_1 block holds its minimum (code 0) and maximum (code 15)
    codes[:, 1::32] = 15
    d = torch.rand(n, k // 32).half().float() * 0.01
    m = -torch.rand(n, k // 32).half().float() * 0.05
    weight = codes * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    got_codes, scale_and_zero = quantize_int4(weight)
    assert torch.equal(got_codes, codes)
    # (q - 8) * d + (m + 8 d) rounds differently from q * d + m only in the last bits
    torch.testing.assert_close(dequantize_int4(got_codes, scale_and_zero), weight, rtol=1e-6, atol=1e-7)


def test_int4_kernel_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 128) * 0.02, torch.randn(3, 128)
    codes, scale_and_zero = quantize_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    expected = x.bfloat16().float() @ dequantize_int4(codes, scale_and_zero.bfloat16()).t()
    got = int4_linear(x, packed, scale_and_zero.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


@pytest.mark.parametrize("cpu_weights", ["bf16", "int4", "int8"])
def test_converted_linear_stays_close_to_fp32(cpu_weights):
    torch.manual_seed(0)
    layer = ReplicatedLinear(128, 64, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        layer.bias.normal_(0, 0.02)
    x = torch.randn(5, 128)
    expected = layer(x)
    assert convert_linear_layers(layer, cpu_weights) == 1
    got = layer(x)
    assert got.dtype == torch.float32
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.1  # not the fp32 layer any more, yet the same function


def test_flag_resolution():
    assert resolve_cpu_weights("auto", torch.device("cpu")) == "fp32"
    assert resolve_cpu_weights("int4", torch.device("cpu")) == "int4"
    assert resolve_cpu_weights("int4", torch.device("cuda")) == "fp32"  # the GPU path is untouched
    assert resolve_cpu_weights("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ValueError, match="supported: auto, fp32, bf16, int4, int8"):
        resolve_cpu_weights("int2", torch.device("cpu"))


def test_int8_kernel_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 128) * 0.02, torch.randn(3, 128)
    codes, scale = quantize_int8(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    torch.testing.assert_close(codes.float() * scale[:, None], weight, rtol=0, atol=scale.max().item() / 2)
    expected = x.bfloat16().float() @ (codes.float() * scale.bfloat16().float()[:, None]).t()
    got = int8_linear(x, codes, scale.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_int8_converts_a_tied_lm_head_and_keeps_the_embedding_fp32():
    from torch import nn

    from dataplane.layers.embed_head import ParallelLMHead, VocabParallelEmbedding

    torch.manual_seed(0)
    model = nn.Module()
    model.embed = VocabParallelEmbedding(96, 64)
    model.head = ParallelLMHead(96, 64)
    with torch.no_grad():
        model.embed.weight.normal_()
    model.head.weight = model.embed.weight
    rows = model.embed.weight.detach().clone()
    hidden = torch.randn(2, 64)
    expected = model.head(hidden)
    assert convert_linear_layers(model, "int8") == 1
    assert model.head.weight.dtype == torch.int8 and torch.equal(model.embed.weight, rows)
    torch.testing.assert_close(model.head(hidden), expected, rtol=0, atol=0.03 * expected.abs().max().item())
