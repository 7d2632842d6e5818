"""Sampler: greedy, top-k/top-p filtering, the exponential race's distribution, and
seeded rows that do not depend on the batch around them."""
import math

import numpy as np
import pytest
import torch

from dataplane.sampling.sampler import Sampler, apply_top_k_top_p, mix_seed, mix_seeds, seeded_noise

NUM_DRAWS = 20_000


def params(n, temperature=1.0, top_p=1.0, top_k=-1, seed=0, has_seed=False, position=0):
    """Sampling params of n rows; each argument a scalar or a per-row list."""
    full = lambda v, dt: torch.as_tensor(v if isinstance(v, list) else [v] * n, dtype=dt)  # noqa: E731
    return dict(temperature=full(temperature, torch.float32), top_p=full(top_p, torch.float32),
                top_k=full(top_k, torch.int32), seed=full(seed, torch.int64), has_seed=full(has_seed, torch.bool),
                positions=full(position, torch.int64))


def expected_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The filtered tempered softmax, computed independently in float64."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[:top_k if top_k > 0 else len(probs)]] = True
    probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    if top_p < 1.0:
        mass, kept = 0.0, np.zeros(len(probs), dtype=bool)
        for i in order:
            if mass >= top_p or probs[i] == 0:
                break
            kept[i], mass = True, mass + probs[i]
        probs = np.where(kept, probs, 0.0) / probs[kept].sum()
    return probs


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    try:
        from scipy.stats import chisquare
    except ImportError:  # 1e-3 critical values of chi-square for the degrees of freedom used here
        stat = (((counts - NUM_DRAWS * probs) ** 2)[support] / (NUM_DRAWS * probs[support])).sum()
        critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
                    10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}[int(support.sum()) - 1]
        return 1.0 if stat < critical else 0.0
    return float(chisquare(counts[support], NUM_DRAWS * probs[support]).pvalue)


@pytest.fixture
def logits_16():
    return torch.randn(16, generator=torch.Generator().manual_seed(3)) * 1.5


def test_greedy_rows_are_argmax_of_raw_logits():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    logits[2, [7, 30]] = 100.0  # a tie: the first index wins, as in torch.argmax
    temps = [0.0, 0.8, 0.0, 1e-6, 1.2, 0.0, 0.5, 0.0]
    out = Sampler().sample(logits, **params(8, temperature=temps, top_k=[5, 5, 1, -1, 3, -1, -1, 2], top_p=0.5),
                           generator=torch.Generator().manual_seed(1))
    greedy = torch.tensor(temps) < 1e-5
    assert out.dtype == torch.int64 and out.shape == (8,)
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])
    assert out[2] == 7
    bf16 = logits.to(torch.bfloat16)
    assert torch.equal(Sampler().sample(bf16, **params(8, temperature=0.0)), bf16.float().argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    logits[5, [10, 20]] = 50.0
    gen = torch.Generator().manual_seed(0)
    for kwargs in [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, seed=list(range(64)), has_seed=True)]:
        out = Sampler().sample(logits, **params(64, temperature=1.3, **kwargs), generator=gen)
        assert torch.equal(out, logits.argmax(-1)), kwargs


def test_apply_top_k_top_p_keeps_the_expected_set():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]] * 4)
    out = apply_top_k_top_p(logits, torch.tensor([2, -1, 3, 5]), torch.tensor([1.0, 0.7, 0.5, 1.0]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [[True, False, True, False, False], [True, False, True, False, False],
                             [True, False, False, False, False], [True] * 5]
    assert torch.equal(out[kept], logits[kept])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, -1, 1.0), (1.0, 5, 1.0), (1.3, -1, 0.8), (0.9, 6, 0.7)])
def test_draws_follow_the_filtered_softmax(logits_16, temperature, top_k, top_p):
    batch = logits_16.expand(NUM_DRAWS, -1)
    out = Sampler().sample(batch, **params(NUM_DRAWS, temperature, top_p, top_k),
                           generator=torch.Generator().manual_seed(42))
    counts = np.bincount(out.numpy(), minlength=16)
    probs = expected_probs(logits_16.numpy(), temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "drew a token that top-k/top-p excluded"
    assert chi_square_p_value(counts, probs) > 1e-3


def test_seeded_draws_follow_the_filtered_softmax(logits_16):
    batch = logits_16.expand(NUM_DRAWS, -1)
    seeds = list(range(NUM_DRAWS))
    out = Sampler().sample(batch, **params(NUM_DRAWS, 0.8, 0.9, 8, seed=seeds, has_seed=True, position=17))
    counts = np.bincount(out.numpy(), minlength=16)
    probs = expected_probs(logits_16.numpy(), 0.8, 8, 0.9)
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_value(counts, probs) > 1e-3


def test_seeded_row_ignores_the_rest_of_the_batch():
    vocab = 1000
    rng = torch.Generator().manual_seed(5)
    target = torch.randn(vocab, generator=rng)
    sampler = Sampler()
    for position in range(0, 40, 3):
        alone = sampler.sample(target[None], **params(1, 0.9, 0.95, 50, seed=1234, has_seed=True, position=position))
        others = torch.randn(5, vocab, generator=rng)
        for row in (0, 2, 5):
            batch = torch.cat([others[:row], target[None], others[row:]])
            temps, top_k = [0.0, 1.0, 0.7, 1.5, 0.0, 0.3], [-1, 10, -1, 1, -1, 20]
            temps.insert(row, 0.9)
            temps.pop()
            top_k.insert(row, 50)
            top_k.pop()
            p = params(6, temps, 0.95, top_k, seed=[7] * 6, has_seed=[i % 2 == 0 for i in range(6)], position=position)
            p["seed"][row], p["has_seed"][row], p["top_p"][row] = 1234, True, 0.95
            out = sampler.sample(batch, **p, generator=torch.Generator().manual_seed(row + position))
            assert out[row] == alone[0], (position, row)


def test_different_seeds_and_positions_draw_differently():
    flat = torch.zeros(64, 1000)
    by_seed = Sampler().sample(flat, **params(64, seed=list(range(64)), has_seed=True, position=3))
    assert len(set(by_seed.tolist())) > 55
    by_position = Sampler().sample(flat, **params(64, seed=99, has_seed=True, position=list(range(64))))
    assert len(set(by_position.tolist())) > 55
    again = Sampler().sample(flat, **params(64, seed=99, has_seed=True, position=list(range(64))))
    assert torch.equal(by_position, again)
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**63 - 1, 2**40) < 2**64


def reference_noise(key: int, token_id: int) -> float:
    """The seeded stream written out with Python ints: lowbias32 twice, keyed by the halves of key."""
    def lowbias32(x):
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    x = lowbias32(lowbias32(token_id ^ (key & 0xFFFFFFFF)) ^ (key >> 32))
    return -math.log(((x >> 8) + 0.5) * 2.0**-24)


def test_seeded_noise_is_a_keyed_exponential_stream():
    keys = [mix_seed(0, 0), mix_seed(1, 0), mix_seed(2**63 - 1, 5), mix_seed(12345, 10**6)]
    noise = seeded_noise(keys, 50_000)
    for row, key in enumerate(keys):
        for token_id in (0, 1, 2, 31_337, 49_999):
            assert noise[row, token_id].item() == pytest.approx(reference_noise(key, token_id), rel=1e-5)
    assert torch.equal(seeded_noise(keys[2:3], 50_000)[0], noise[2])
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01) and noise.var().item() == pytest.approx(1.0, abs=0.03)
    assert abs(np.corrcoef(noise[0].numpy(), noise[1].numpy())[0, 1]) < 0.02


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mix_seeds_on_the_device_equals_mix_seed(device):
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**63 - 1, 500, dtype=np.int64).tolist() + [0, 1, 2**63 - 1]
    positions = rng.integers(0, 2**40, len(seeds)).tolist()
    keys = mix_seeds(torch.tensor(seeds, device=device), torch.tensor(positions, device=device))
    assert [k % 2**64 for k in keys.cpu().tolist()] == [mix_seed(s, p) for s, p in zip(seeds, positions)]
    # the integer keys are bit-exact; the noise is -log(u) of the same u, and CUDA's log may differ by an ulp
    torch.testing.assert_close(seeded_noise(keys, 1000, device).cpu(),
                               seeded_noise([mix_seed(s, p) for s, p in zip(seeds, positions)], 1000),
                               rtol=0 if device == "cpu" else 1e-6, atol=0)


def test_unseeded_rows_follow_the_generator():
    logits = torch.zeros(32, 500)
    a = Sampler().sample(logits, **params(32), generator=torch.Generator().manual_seed(8))
    b = Sampler().sample(logits, **params(32), generator=torch.Generator().manual_seed(8))
    c = Sampler().sample(logits, **params(32), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_rows_match_between_cpu_and_cuda():
    logits = torch.randn(256, 32000, generator=torch.Generator().manual_seed(4))
    p = params(256, 0.8, 0.9, 40, seed=list(range(256)), has_seed=True, position=11)
    cpu = Sampler().sample(logits, **p)
    cuda = Sampler().sample(logits.cuda(), **{k: v.cuda() for k, v in p.items()},
                            generator=torch.Generator(device="cuda").manual_seed(0))
    assert cuda.device.type == "cuda"
    keys = [mix_seed(s, 11) for s in range(256)]
    assert torch.allclose(seeded_noise(keys, 32000, "cuda").cpu(), seeded_noise(keys, 32000), rtol=1e-6, atol=0)
    # same noise bits (log may differ in the last ulp, as may the softmax), so allow rare flips
    assert (cuda.cpu() == cpu).float().mean() > 0.99
