"""The fused MoE kernel (dataplane/layers/fused_moe.py) against the torch expert loop, and the router.

Without CUDA the kernel runs under the Triton interpreter on small shapes; the `gpu` test runs
Qwen3-30B-A3B-like shapes in bf16.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused MoE kernel cannot run here")

from dataplane.layers.moe import experts_torch, select_experts  # noqa: E402

fused_moe = kernel_module("dataplane.layers.fused_moe")


def _problem(num_tokens, hidden, intermediate, num_experts, top_k, seed=0, device="cpu", dtype=torch.float32,
             unused_experts=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, list(unused_experts)] = -1e9  # experts no token chooses: their weights must not be read into a row
    weights, ids = select_experts(logits, top_k, renormalize=True)
    on = dict(device=device, dtype=dtype)
    return x.to(**on), w13.to(**on), w2.to(**on), weights.to(**on), ids.to(device)


@pytest.mark.parametrize("num_tokens, hidden, intermediate, num_experts, top_k, unused", [
    (1, 32, 16, 4, 2, ()),  # one decode token
    (13, 48, 40, 6, 2, (0, 3)),  # sizes not multiples of the blocks; two experts idle
    (37, 32, 24, 8, 3, (5,)),  # more rows than one block of an expert
])
def test_fused_experts_match_the_torch_loop(num_tokens, hidden, intermediate, num_experts, top_k, unused):
    x, w13, w2, weights, ids = _problem(num_tokens, hidden, intermediate, num_experts, top_k, unused_experts=unused)
    want = experts_torch(x, w13, w2, weights, ids)
    got = fused_moe.fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_align_by_expert_groups_every_pair_once_in_blocks_of_one_expert():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]], dtype=torch.int32)
    sorted_pairs, block_experts, num_padded = fused_moe.align_by_expert(ids, num_experts=4, block_m=4)
    used = int(num_padded)
    assert used == 12  # expert 0: 3 pairs -> 4 rows, expert 1: 1 -> 4, expert 2: 4 -> 4, expert 3: none
    real = sorted_pairs[:used][sorted_pairs[:used] < ids.numel()]
    assert sorted(real.tolist()) == list(range(ids.numel()))
    flat = ids.flatten()
    for block in range(used // 4):
        pairs = sorted_pairs[block * 4:(block + 1) * 4]
        pairs = pairs[pairs < ids.numel()]
        assert (flat[pairs.long()] == block_experts[block]).all()
    assert (sorted_pairs[used:] == ids.numel()).all()


def test_router_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = select_experts(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, logits[:, :2].softmax(-1))  # Mixtral: softmax over the top-k logits


@pytest.mark.gpu
def test_fused_experts_on_gpu_qwen3_30b_a3b_shapes():
    for num_tokens in (1, 7, 256, 1024):
        x, w13, w2, weights, ids = _problem(num_tokens, 2048, 768, 128, 8, device="cuda", dtype=torch.bfloat16)
        want = experts_torch(x.float(), w13.float(), w2.float(), weights.float(), ids)
        got = fused_moe.fused_experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
