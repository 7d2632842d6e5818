"""The grammar bitmask on the data plane (dataplane/sampling/grammar_mask.py): the torch path against a
plain per-token loop, and the Triton kernel against the torch path (under TRITON_INTERPRET=1 without CUDA),
with a vocabulary that does not fill the last word and one wider than the mask (a padded LM head)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()

from dataplane.sampling.grammar_mask import allowed_tokens, apply_grammar_bitmask_torch  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def random_case(num_rows: int, vocab: int, mask_vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    words = (mask_vocab + 31) // 32
    allowed = rng.random((3, words * 32)) < 0.3
    allowed[:, mask_vocab:] = False
    bitmask = np.packbits(allowed, axis=1, bitorder="little").view(np.int32).copy()
    logits = torch.from_numpy(rng.standard_normal((num_rows, vocab)).astype(np.float32))
    rows = torch.tensor([0, 2, num_rows - 1])
    return logits, rows, torch.from_numpy(bitmask), allowed


@pytest.mark.parametrize("vocab, mask_vocab", [(1000, 1000), (1024, 1000), (990, 1000)])
def test_torch_path_bans_exactly_the_unset_bits(vocab, mask_vocab):
    logits, rows, bitmask, allowed = random_case(5, vocab, mask_vocab, seed=vocab)
    before = logits.clone()
    apply_grammar_bitmask_torch(logits, rows, bitmask)
    for i, row in enumerate(rows.tolist()):
        for t in range(vocab):
            ok = t < allowed.shape[1] and allowed[i, t]
            assert logits[row, t] == (before[row, t] if ok else float("-inf"))
    untouched = [r for r in range(5) if r not in rows.tolist()]
    assert torch.equal(logits[untouched], before[untouched])
    assert allowed_tokens(bitmask, vocab).shape == (3, vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_torch(dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    kernel = kernel_module("dataplane.sampling.grammar_mask_kernel")
    logits, rows, bitmask, _ = random_case(4, 5000, 4990, seed=1)
    logits = logits.to(DEVICE, dtype)
    want = logits.clone()
    apply_grammar_bitmask_torch(want, rows.to(DEVICE), bitmask.to(DEVICE))
    kernel.apply(logits, rows.to(DEVICE), bitmask.to(DEVICE))
    assert torch.equal(logits, want)
