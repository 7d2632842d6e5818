"""The fused sampling tail (dataplane/sampling/fused_tail.py) against sampler.py's torch path and
penalties.apply_penalties. On a machine without CUDA the kernel runs under the Triton interpreter
(a few hundred ms a row), so the CPU tests take few rows: the kept set of every row (the tokens that
min-p, top-k and top-p leave, ties included) against the torch filters, the penalised logits bit for
bit, greedy rows against the torch argmax, and seeded rows token for token against the torch path
(the same integer-hash noise over the same kept set: equal tokens for every seed mean the same
distribution, which test_sampling_distributions.py checks for the torch path). A small chi-square
checks unseeded draws; the `gpu` tests run 256 rows of Qwen3's vocabulary in bf16.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused tail cannot run here")

from dataplane.sampling import sampler as sampler_module  # noqa: E402
from dataplane.sampling.penalties import PenaltyState, RowPenalties  # noqa: E402
from dataplane.sampling.sampler import (GREEDY_TEMPERATURE, Sampler, apply_min_p, apply_top_k_top_p,  # noqa: E402
                                        mix_seeds)

fused_tail = kernel_module("dataplane.sampling.fused_tail")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
QWEN3_VOCAB = 151_936


def random_params(rng: np.random.Generator, num_rows: int, vocab: int, seeded: bool) -> dict[str, torch.Tensor]:
    """Per row a random mix of filters (some off), temperatures, a few greedy rows."""
    temperature = rng.uniform(0.3, 1.8, num_rows)
    temperature[rng.random(num_rows) < 0.15] = 0.0
    top_k = np.where(rng.random(num_rows) < 0.5, rng.integers(1, vocab // 4, num_rows), -1)
    top_p = np.where(rng.random(num_rows) < 0.6, rng.uniform(0.2, 0.99, num_rows), 1.0)
    min_p = np.where(rng.random(num_rows) < 0.4, rng.uniform(0.001, 0.3, num_rows), 0.0)
    as_t = lambda a, dt: torch.tensor(a, dtype=dt, device=DEVICE)  # noqa: E731
    return dict(temperature=as_t(temperature, torch.float32), top_p=as_t(top_p, torch.float32),
                top_k=as_t(top_k, torch.int32), min_p=as_t(min_p, torch.float32),
                seed=as_t(rng.integers(0, 2**62, num_rows), torch.int64),
                has_seed=torch.full((num_rows,), seeded, device=DEVICE),
                positions=as_t(rng.integers(0, 5000, num_rows), torch.int64))


def random_penalties(rng: np.random.Generator, num_rows: int, vocab: int) -> RowPenalties:
    """Every other row uses penalties, at scattered slots, with histories that repeat tokens."""
    rows = np.arange(0, num_rows, 2)
    slots = rng.permutation(2 * num_rows)[:len(rows)]
    state = PenaltyState(2 * num_rows, vocab, torch.device(DEVICE))
    state.reset(slots)
    for slot in slots:
        prompt = rng.integers(0, vocab, rng.integers(1, vocab // 3))
        output = rng.integers(0, vocab // 5, rng.integers(0, 60))
        tokens = torch.from_numpy(np.concatenate([prompt, output])).to(DEVICE)
        state.observe(tokens, np.full(len(tokens), slot), np.arange(len(tokens)) < len(prompt))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32, device=DEVICE)  # noqa: E731
    args = dict(repetition_penalty=as_t(rng.uniform(0.5, 2.0, len(rows))),
                presence_penalty=as_t(rng.uniform(-2.0, 2.0, len(rows))),
                frequency_penalty=as_t(rng.uniform(-2.0, 2.0, len(rows))))
    index = lambda a: torch.from_numpy(a.astype(np.int64)).to(DEVICE)  # noqa: E731
    return RowPenalties(state, index(rows), index(slots), args)


def random_logits(num_rows: int, vocab: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits with a few banned tokens; in bf16 many tie, as a real LM head's do."""
    logits = (2.0 * torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed))).to(dtype)
    logits[:, 7] = float("-inf")
    return logits.to(DEVICE)


def torch_tail(logits: torch.Tensor, p: dict, penalties: RowPenalties | None):
    """sampler.py's steps: the penalised float32 logits, and the kept set of every row."""
    penalised = logits.float()
    if penalties is not None:
        penalties.apply_(penalised)
    greedy = p["temperature"] < GREEDY_TEMPERATURE
    scaled = penalised / torch.where(greedy, 1.0, p["temperature"]).unsqueeze(1)
    kept = torch.isfinite(apply_top_k_top_p(apply_min_p(scaled, p["min_p"]), p["top_k"], p["top_p"]))
    return penalised, kept


def fused(logits, p, penalties, generator_seed=0, **kwargs):
    return fused_tail.sample(logits, p["temperature"], p["top_p"], p["top_k"], p["min_p"], p["has_seed"],
                             mix_seeds(p["seed"], p["positions"]),
                             torch.Generator(device=DEVICE).manual_seed(generator_seed),
                             greedy_below=GREEDY_TEMPERATURE, penalties=penalties, write_kept=True, **kwargs)


def torch_path_tokens(logits, p, penalties):
    saved = sampler_module.fused_sample
    sampler_module.fused_sample = None
    try:
        return Sampler().sample(logits.float(), **p, generator=torch.Generator(device=DEVICE).manual_seed(0),
                                penalties=penalties)
    finally:
        sampler_module.fused_sample = saved


@pytest.mark.parametrize("vocab, block_v, num_rows, dtype", [(1000, 1024, 14, torch.bfloat16),
                                                              (200, 64, 6, torch.float32)],
                         ids=["one chunk, bf16", "several chunks, fp32"])
def test_kept_sets_penalties_greedy_and_seeded_tokens_match_the_torch_path(vocab, block_v, num_rows, dtype):
    rng = np.random.default_rng(vocab)
    logits = random_logits(num_rows, vocab, vocab, dtype)
    p = random_params(rng, num_rows, vocab, seeded=True)
    penalties = random_penalties(rng, num_rows, vocab)
    tokens, kept, penalised = fused(logits, p, penalties, block_v=block_v)
    want_penalised, want_kept = torch_tail(logits, p, penalties)
    greedy = (p["temperature"] < GREEDY_TEMPERATURE).cpu()
    assert 0 < greedy.sum() < num_rows
    sampled = ~greedy
    torch.testing.assert_close(penalised[sampled], want_penalised[sampled], rtol=0, atol=0)
    for row in np.flatnonzero(sampled.numpy()):
        assert torch.equal(kept[row], want_kept[row]), (
            f"row {row} {[(k, v[row].item()) for k, v in p.items() if k not in ('seed', 'positions')]}: "
            f"kept {kept[row].sum()} tokens, the torch filters {want_kept[row].sum()}")
        assert kept[row, tokens[row]], "drew a token the filters drop"
    assert want_kept[sampled].sum(-1).float().mean() > 2, "the filters should keep several tokens per row"
    assert torch.equal(tokens, torch_path_tokens(logits, p, penalties)), "greedy and seeded rows draw as the torch path"


def test_top_k_keeps_the_lowest_ids_among_ties_at_the_cut():
    logits = torch.zeros(2, 64, device=DEVICE)
    logits[:, [3, 10]] = 2.0
    logits[:, [5, 9, 20, 40, 41]] = 1.0  # the cut falls inside these ties
    p = dict(temperature=torch.tensor([1.0, 1.0]), top_p=torch.tensor([1.0, 0.75]), top_k=torch.tensor([4, 5]),
             min_p=torch.tensor([0.0, 0.0]), seed=torch.tensor([1, 2]), has_seed=torch.tensor([False, True]),
             positions=torch.tensor([0, 0]))
    p = {k: v.to(DEVICE) for k, v in p.items()}
    _, kept, _ = fused(logits, p, None, block_v=32)
    assert torch.nonzero(kept[0]).flatten().tolist() == [3, 5, 9, 10]
    # top-k keeps 3, 5, 9, 10, 20; top-p's mass reaches 0.75 inside the ties: only the first of them stays
    assert torch.nonzero(kept[1]).flatten().tolist() == [3, 5, 10]
    assert torch.equal(kept, torch_tail(logits, p, None)[1])


def test_unseeded_draws_follow_the_filtered_penalised_softmax():
    """Chi-square over 160 draws (the interpreter is slow): one row's logits, min-p and penalties (no search
    passes, so a draw is cheap here); the GPU test below draws all filters at full size."""
    vocab, num_draws = 12, 160
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -3.0, -6.0], device=DEVICE)
    batch = logits.expand(num_draws, -1)
    as_t = lambda v, dt: torch.full((num_draws,), v, dtype=dt, device=DEVICE)  # noqa: E731
    p = dict(temperature=as_t(0.9, torch.float32), top_p=as_t(1.0, torch.float32), top_k=as_t(-1, torch.int32),
             min_p=as_t(0.05, torch.float32), seed=as_t(0, torch.int64), has_seed=as_t(False, torch.bool),
             positions=as_t(0, torch.int64))
    state = PenaltyState(1, vocab, torch.device(DEVICE))
    state.reset(np.array([0]))
    state.observe(torch.tensor([0, 0, 3], device=DEVICE), np.zeros(3, np.int64), np.array([False, False, True]))
    rows = torch.arange(num_draws, device=DEVICE)
    penalties = RowPenalties(state, rows, torch.zeros(num_draws, dtype=torch.int64, device=DEVICE),
                             dict(repetition_penalty=as_t(1.5, torch.float32),
                                  presence_penalty=as_t(0.3, torch.float32),
                                  frequency_penalty=as_t(0.2, torch.float32)))
    tokens, kept, penalised = fused(batch, p, penalties, generator_seed=5, block_v=32)
    probs = torch.softmax(penalised[0].double() / 0.9, -1).cpu().numpy()
    probs = np.where(probs >= 0.05 * probs.max(), probs, 0.0)
    probs /= probs.sum()
    assert np.array_equal(probs > 0, kept[0].cpu().numpy()) and 4 <= (probs > 0).sum() < vocab
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    assert counts[probs == 0].sum() == 0
    assert_chi_square(counts[probs > 0], num_draws * probs[probs > 0])


def assert_chi_square(counts: np.ndarray, expected: np.ndarray) -> None:
    statistic = ((counts - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                      torch.tensor(statistic / 2, dtype=torch.float64)).item()
    assert p_value > 1e-3, f"chi-square p = {p_value:.2g}: counts {counts}, expected {expected.round(1)}"


# ---------------------------------------------------------------- GPU: 256 rows of Qwen3's vocabulary, bf16

def qwen3_batch(seeded: bool):
    rng = np.random.default_rng(11)
    logits = 3.0 * torch.randn(256, QWEN3_VOCAB, generator=torch.Generator().manual_seed(12))
    logits = logits.to("cuda", torch.bfloat16)
    p = random_params(rng, 256, QWEN3_VOCAB, seeded)
    p["top_k"][::3] = torch.tensor(rng.integers(1, 2000, len(p["top_k"][::3])), dtype=torch.int32, device="cuda")
    state = PenaltyState(512, QWEN3_VOCAB, torch.device("cuda"))
    slots = rng.permutation(512)[:128]
    state.reset(slots)
    for slot in slots:  # ~1000 prompt tokens and ~500 outputs a row
        tokens = torch.from_numpy(rng.integers(0, QWEN3_VOCAB, 1500)).cuda()
        state.observe(tokens, np.full(1500, slot), np.arange(1500) < 1000)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32, device="cuda")  # noqa: E731
    penalties = RowPenalties(state, torch.arange(0, 256, 2, device="cuda"), torch.from_numpy(slots).cuda(),
                             dict(repetition_penalty=as_t(rng.uniform(0.8, 1.5, 128)),
                                  presence_penalty=as_t(rng.uniform(-1, 1, 128)),
                                  frequency_penalty=as_t(rng.uniform(-1, 1, 128))))
    return logits, p, penalties


@gpu
@pytest.mark.parametrize("seeded", [False, True])
def test_gpu_qwen3_vocab_kept_sets_and_tokens_match_the_torch_path(seeded):
    logits, p, penalties = qwen3_batch(seeded)
    tokens, kept, penalised = fused(logits, p, penalties)
    want_penalised, want_kept = torch_tail(logits, p, penalties)
    sampled = p["temperature"] >= GREEDY_TEMPERATURE
    torch.testing.assert_close(penalised[sampled], want_penalised[sampled], rtol=0, atol=0)
    # float32 sums in another order may move a cut by a token or two within rounding of a min-p / top-p
    # boundary: such tokens lie at the value of the last token both keep, or next to it in bf16
    scaled = want_penalised / torch.where(sampled, p["temperature"], 1.0).unsqueeze(1)
    for row in torch.nonzero(((kept != want_kept).sum(-1) > 0) & sampled).flatten().tolist():
        differing = kept[row] != want_kept[row]
        assert differing.sum() <= 3, f"row {row}: {differing.sum()} tokens differ"
        last_kept = scaled[row][kept[row] & want_kept[row]].min()
        assert torch.allclose(scaled[row][differing], last_kept, rtol=0.01), (row, scaled[row][differing], last_kept)
    assert ((kept != want_kept).sum(-1) > 0)[sampled].float().mean() < 0.1
    assert kept[sampled].gather(1, tokens[sampled].unsqueeze(1)).all(), "drew a token the filters drop"
    want = torch_path_tokens(logits, p, penalties)
    if seeded:
        assert (tokens != want).sum() <= 3, "seeded rows draw the torch path's tokens, but for near-ties"
    else:
        greedy = ~sampled
        assert torch.equal(tokens[greedy], want[greedy])


@gpu
def test_gpu_qwen3_vocab_draws_follow_the_filtered_distribution():
    """Four configs of 64 rows each, one row's logits, 40 batches: chi-square over hot tokens and the rest."""
    hot = [0, 1023, 1024, 4095, 75_000, QWEN3_VOCAB - 1]
    logits = torch.randn(QWEN3_VOCAB, generator=torch.Generator().manual_seed(8)) - 4.0
    logits[hot] = torch.tensor([3.0, 2.6, 2.6, 2.2, 1.8, 1.5])
    logits = logits.to("cuda", torch.bfloat16)
    configs = [(0.7, 0.0, -1, 0.9), (1.0, 0.02, -1, 1.0), (1.0, 0.0, 4, 1.0), (1.2, 0.0, 50, 0.8)]
    def as_t(i, dtype):
        return torch.tensor([c[i] for c in configs], dtype=dtype, device="cuda").repeat_interleave(64)
    p = dict(temperature=as_t(0, torch.float32), min_p=as_t(1, torch.float32), top_k=as_t(2, torch.int32),
             top_p=as_t(3, torch.float32), has_seed=torch.zeros(256, dtype=torch.bool, device="cuda"))
    generator = torch.Generator(device="cuda").manual_seed(3)
    keys = torch.zeros(256, dtype=torch.int64, device="cuda")
    draws = torch.stack([fused_tail.sample(logits.expand(256, -1), p["temperature"], p["top_p"], p["top_k"], p["min_p"],
                                           p["has_seed"], keys, generator, greedy_below=GREEDY_TEMPERATURE)
                         for _ in range(40)]).cpu().numpy()
    _, kept = torch_tail(logits.expand(len(configs), -1), {k: v[::64] for k, v in p.items()}, None)
    for i, (temperature, *_) in enumerate(configs):
        probs = torch.softmax(logits.double() / temperature, -1).cpu().numpy() * kept[i].cpu().numpy()
        probs /= probs.sum()
        bucket = np.full(QWEN3_VOCAB, len(hot))
        bucket[hot] = np.arange(len(hot))
        counts = np.bincount(bucket[draws[:, 64 * i:64 * (i + 1)].ravel()], minlength=len(hot) + 1)
        expected = np.bincount(bucket, weights=probs, minlength=len(hot) + 1) * draws[:, :64].size
        assert counts[expected == 0].sum() == 0, f"config {configs[i]} drew a dropped token"
        assert_chi_square(counts[expected > 0], expected[expected > 0])
