"""Raw logprobs of sampled and prompt tokens: value, rank (1 + strictly more likely tokens), top N."""
import numpy as np
import torch

from dataplane.sampling import logprobs as logprobs_module
from dataplane.sampling.logprobs import prompt_logprobs, raw_logprobs, token_logprobs


def test_token_logprobs_give_value_rank_and_top_most_likely_first():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    lp = raw_logprobs(logits)
    out = token_logprobs(lp, torch.tensor([1, 2]), num_top=2)
    np.testing.assert_allclose(out.logprobs, lp[[0, 1], [1, 2]].numpy(), rtol=1e-6)
    assert out.ranks.tolist() == [3, 1]
    assert out.top_token_ids.tolist() == [2, 0, 2, 3]
    np.testing.assert_allclose(out.top_logprobs, lp.topk(2).values.reshape(-1).numpy(), rtol=1e-6)
    none = token_logprobs(lp, torch.tensor([0, 0]), num_top=0)
    assert none.top_token_ids.size == 0 and none.ranks.tolist() == [2, 3]  # ids 0 and 1 tie in row 1: both rank 3


def test_prompt_logprobs_are_computed_in_chunks_of_rows(monkeypatch):
    monkeypatch.setattr(logprobs_module, "PROMPT_ROWS_PER_CHUNK", 3)
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def compute_logits(h):
        calls.append(len(h))
        return h @ weight.T

    rows, targets = torch.tensor([0, 1, 2, 5, 6, 7, 8]), torch.tensor([3, 4, 5, 6, 7, 8, 9])
    out = prompt_logprobs(compute_logits, hidden, rows, targets, num_top=1)
    whole = token_logprobs(raw_logprobs(hidden[rows] @ weight.T), targets, 1)
    assert calls == [3, 3, 1]
    for name in ("logprobs", "ranks", "top_token_ids", "top_logprobs"):
        np.testing.assert_allclose(getattr(out, name), getattr(whole, name), rtol=1e-6)
