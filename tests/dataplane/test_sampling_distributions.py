"""Draws follow the tempered, filtered softmax computed independently here in float64, for
min-p alone and every filter combined, with different params per row of one batch,
seeded and unseeded (chi-square with fixed seeds, so the outcome is deterministic)."""
import numpy as np
import pytest
import torch

from dataplane.sampling.sampler import Sampler, apply_min_p

NUM_DRAWS = 20_000
VOCAB = 16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (temperature, min_p, top_k, top_p)
CONFIGS = {
    "min_p": (1.0, 0.1, -1, 1.0),
    "min_p, cold": (0.8, 0.15, -1, 1.0),
    "min_p, hot": (1.5, 0.05, -1, 1.0),
    "min_p + top_k": (1.0, 0.05, 5, 1.0),
    # min-p before top-p matters here: the other order keeps 7 tokens, not 4 (and 6, not 5)
    "min_p + top_p": (1.3, 0.2, -1, 0.7),
    "all four": (1.3, 0.2, 8, 0.8),
    "top_k + top_p": (1.1, 0.0, 8, 0.9),
}


def reference_probs(logits: np.ndarray, temperature: float, min_p: float, top_k: int, top_p: float) -> np.ndarray:
    """vLLM v1's order: temperature, then min-p, top-k, top-p, each renormalising what survives."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    if top_k > 0:
        probs[order[top_k:]] = 0.0
        probs /= probs.sum()
    if top_p < 1.0:
        kept, mass = np.zeros(len(probs), dtype=bool), 0.0
        for i in order:
            if mass >= top_p or probs[i] == 0:
                break
            kept[i], mass = True, mass + probs[i]
        probs = np.where(kept, probs, 0.0) / probs[kept].sum()
    return probs


def rows_of(configs: list[tuple], n: int, device: str, **extra) -> dict:
    """Per-row sampler params: n rows of each config, in order."""
    column = lambda i, dt: torch.tensor([c[i] for c in configs for _ in range(n)], dtype=dt, device=device)  # noqa: E731
    rows = n * len(configs)
    return dict(temperature=column(0, torch.float32), min_p=column(1, torch.float32), top_k=column(2, torch.int32),
                top_p=column(3, torch.float32), seed=torch.arange(rows, device=device) * 7919 + extra.get("salt", 0),
                has_seed=torch.full((rows,), extra.get("seeded", False), device=device),
                positions=torch.full((rows,), 5, device=device))


def chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test: P(chi2 with len - 1 degrees of freedom >= the statistic), the upper regularised gamma."""
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


def assert_follows(draws: np.ndarray, probs: np.ndarray, label: str) -> None:
    counts = np.bincount(draws, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, f"{label}: drew a token the filters drop"
    support = probs > 0
    if support.sum() > 1:
        p_value = chi_square_p_value(counts[support], len(draws) * probs[support])
        assert p_value > 1e-3, f"{label}: chi-square p = {p_value:.2g}"


@pytest.fixture(scope="module")
def logits():
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 1.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_each_row_follows_its_own_filtered_softmax_in_one_mixed_batch(logits, device, seeded):
    configs = list(CONFIGS.values())
    batch = logits.to(device).expand(NUM_DRAWS * len(configs), -1)
    params = rows_of(configs, NUM_DRAWS, device, seeded=seeded)
    out = Sampler().sample(batch, **params, generator=torch.Generator(device=device).manual_seed(42)).cpu().numpy()
    for i, (name, config) in enumerate(CONFIGS.items()):
        probs = reference_probs(logits.numpy(), *config)
        assert 1 < (probs > 0).sum() < VOCAB, f"{name}: pick a config whose filters bite"
        assert_follows(out[i * NUM_DRAWS:(i + 1) * NUM_DRAWS], probs, name)


@pytest.mark.parametrize("device", DEVICES)
def test_min_p_keeps_exactly_the_tokens_above_the_scaled_maximum(device):
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.1, 0.05], [0.2] * 5], device=device))
    out = apply_min_p(logits, torch.tensor([0.3, 1.0], device=device))
    assert torch.isfinite(out).cpu().tolist() == [[True, True, False, False, False], [True] * 5]
    assert torch.equal(apply_min_p(logits, torch.zeros(2, device=device)), logits)


def test_min_p_one_is_greedy_and_min_p_zero_changes_nothing(logits):
    batch = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    greedy = Sampler().sample(batch, **rows_of([(1.3, 1.0, -1, 1.0)], 64, "cpu"), generator=gen())
    assert torch.equal(greedy, batch.argmax(-1))
    plain = rows_of([(0.8, 0.0, -1, 1.0)], 64, "cpu")
    without = {k: v for k, v in plain.items() if k != "min_p"}
    assert torch.equal(Sampler().sample(batch, **plain, generator=gen()),
                       Sampler().sample(batch, **without, generator=gen()))
