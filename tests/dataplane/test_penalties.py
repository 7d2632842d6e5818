"""Penalties on the same logits as HF transformers' RepetitionPenaltyLogitsProcessor (over prompt and
output) and OpenAI's presence/frequency formula (over the output), per row of one batch; min_tokens bans."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from dataplane.sampling.penalties import PenaltyState, apply_penalties, ban_tokens

VOCAB = 300
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def history(rng, num_rows):
    """Per row: prompt ids and output ids, with repeats, some rows without outputs."""
    rows = []
    for r in range(num_rows):
        prompt = rng.integers(0, VOCAB, rng.integers(1, 40)).tolist()
        output = rng.integers(0, 60, rng.integers(0, 50) if r % 3 else 0).tolist()  # a narrow range: many repeats
        rows.append((prompt, output))
    return rows


def state_of(rows, slots, device) -> PenaltyState:
    state = PenaltyState(max_num_seqs=16, vocab_size=VOCAB, device=torch.device(device))
    state.reset(np.array(slots))
    for (prompt, output), slot in zip(rows, slots):
        tokens = torch.tensor(prompt + output, device=device)
        state.observe(tokens, np.full(len(tokens), slot), np.arange(len(tokens)) < len(prompt))
    return state


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_matches_hf_processor(device):
    rng = np.random.default_rng(0)
    rows = history(rng, 8)
    penalties = [1.3, 0.7, 2.0, 1.0, 1.05, 0.5, 1.8, 1.2]
    slots = [3, 0, 15, 7, 1, 9, 2, 4]
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1)).to(device) * 3
    logits[0, :5] = 0.0  # zero logits: HF divides, we multiply; both give 0
    state = state_of(rows, slots, device)
    ours = state.apply(logits.clone(), torch.tensor(slots, device=device), torch.tensor(penalties, device=device),
                       torch.zeros(8, device=device), torch.zeros(8, device=device))
    for r, ((prompt, output), penalty) in enumerate(zip(rows, penalties)):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output], device=device),
                                                        logits[r:r + 1].clone())
        # exact on CPU; CUDA may divide by a scalar through its reciprocal (HF) but by a tensor exactly (ours)
        torch.testing.assert_close(ours[r:r + 1], hf, rtol=0 if device == "cpu" else 1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_presence_and_frequency_follow_openai_over_the_output_after_repetition(device):
    rng = np.random.default_rng(1)
    rows = history(rng, 6)
    slots = list(range(6))
    rep = [1.0, 1.0, 1.4, 1.0, 0.8, 1.1]
    presence = [0.5, 0.0, -1.0, 2.0, 0.3, -2.0]
    frequency = [0.0, 1.0, 0.5, -0.7, 2.0, 0.25]
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2)).to(device)
    state = state_of(rows, slots, device)
    as_t = lambda v: torch.tensor(v, device=device)  # noqa: E731
    ours = state.apply(logits.clone(), as_t(slots), as_t(rep), as_t(presence), as_t(frequency))
    for r, (prompt, output) in enumerate(rows):
        expected = RepetitionPenaltyLogitsProcessor(rep[r])(torch.tensor([prompt + output], device=device),
                                                            logits[r:r + 1].clone())[0].double().cpu()
        counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=VOCAB)  # prompt tokens do not count
        expected -= torch.from_numpy(counts * frequency[r] + (counts > 0) * presence[r])
        torch.testing.assert_close(ours[r].double().cpu(), expected, rtol=0, atol=1e-5)


def test_rows_are_per_slot_and_reset_empties_them():
    state = state_of([([1, 2], [3, 3]), ([4], [5])], [0, 1], "cpu")
    assert state.prompt_mask[0, [1, 2]].all() and not state.prompt_mask[0, 3]
    assert state.output_counts[0, 3] == 2 and state.output_counts[1, 5] == 1 and state.output_counts[0, 5] == 0
    state.reset(np.array([0]))
    assert not state.prompt_mask[0].any() and not state.output_counts[0].any()
    assert state.output_counts[1, 5] == 1  # the other slot keeps its history


def test_state_is_allocated_only_when_a_penalty_is_used():
    state = PenaltyState(max_num_seqs=256, vocab_size=151_936, device=torch.device("cpu"))
    state.reset(np.zeros(0, np.int64))
    assert not state.allocated
    state.reset(np.array([5]))
    assert state.allocated and state.output_counts.dtype == torch.int32


def test_no_penalty_leaves_logits_unchanged():
    logits = torch.randn(2, VOCAB)
    mask = torch.ones(2, VOCAB, dtype=torch.bool)
    counts = torch.full((2, VOCAB), 3, dtype=torch.int32)
    out = apply_penalties(logits, mask, counts, torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert torch.equal(out, logits)


def test_ban_tokens_sets_pairs_to_minus_infinity():
    logits = torch.zeros(3, 10)
    ban_tokens(logits, torch.tensor([0, 0, 2]), torch.tensor([4, 9, 1]))
    banned = torch.isinf(logits)
    assert banned.nonzero().tolist() == [[0, 4], [0, 9], [2, 1]]
    ban_tokens(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
