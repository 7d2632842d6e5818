"""Fused sampling (dataplane/sampling/fused_sample.py) against torch.argmax, the tempered softmax
computed in float64, and the Sampler's torch path, which keeps every batch with a filtered or seeded
row; batches with penalties take the fused tail instead (test_fused_tail.py). On a machine without CUDA the kernels run
under the Triton interpreter (about 30 ms a program, so the tests pass tiles of many rows); the
`gpu` tests run Qwen3's vocabulary (151936) at batch 256 in bf16, and one prints the torch path's
time against the fused one's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the fused sampler cannot run here")

from dataplane.layers import fused_ops  # noqa: E402
from dataplane.sampling import sampler as sampler_module  # noqa: E402
from dataplane.sampling.penalties import PenaltyState, RowPenalties  # noqa: E402
from dataplane.sampling.sampler import GREEDY_TEMPERATURE, Sampler, plan_sampling  # noqa: E402


fused_sample = kernel_module("dataplane.sampling.fused_sample")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
NUM_DRAWS = 20_000
QWEN3_VOCAB = 151_936


def draw(logits, temperature, seed: int | None = 0, tile=None, generator=None):
    if seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(seed)
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    return fused_sample.sample(logits, temperature, generator, greedy_below=GREEDY_TEMPERATURE, tile=tile)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test: P(chi2 with len - 1 degrees of freedom >= the statistic), the upper regularised gamma."""
    expected = counts.sum() * probs
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


def tempered_softmax(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return torch.softmax(logits.double().cpu() / temperature, dim=-1).numpy()


# ---------------------------------------------------------------- greedy rows: exactly torch.argmax

def tied_logits(num_rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed))
    for row, ids in enumerate([[5, 2100], [2, 1], [7, 4], [1027, 1025], [vocab - 1], [8, 12, 4]]):
        logits[row % num_rows, ids] = 50.0  # ties across chunks, across the four Philox words, within one
    logits[-1] = float("-inf")  # a fully banned row: id 0, as torch.argmax
    return logits


@pytest.mark.parametrize("tile", [None, (8, 1024), (8, 4096), (2, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_are_the_argmax_ties_to_the_lowest_id(tile, dtype):
    logits = tied_logits(7, 3000).to(DEVICE, dtype)
    out = draw(logits, [0.0] * 6 + [1e-6], tile=tile)
    assert out.dtype == torch.int64 and out.shape == (7,)
    assert torch.equal(out, logits.argmax(-1))
    assert out.tolist()[:6] == [5, 1, 4, 1025, 2999, 4]


def test_bf16_greedy_matches_argmax_with_many_rounding_ties():
    logits = 3.0 + 0.01 * torch.randn(16, 700, generator=torch.Generator().manual_seed(1))
    logits = logits.to(DEVICE, torch.bfloat16)
    assert (logits == logits.max(-1, keepdim=True).values).sum(-1).min() > 1, "want ties in every row"
    assert torch.equal(draw(logits, [0.0] * 16, tile=(16, 256)), logits.argmax(-1))


def test_mixed_batch_greedy_rows_exact_and_sampled_rows_drawn():
    logits = torch.randn(32, 512, generator=torch.Generator().manual_seed(2), device="cpu").to(DEVICE)
    logits[:, 300:] = float("-inf")  # banned: never drawn
    temps = torch.tensor([0.0, 1.0, 1e-6, 2.0] * 8)
    out = draw(logits, temps, tile=(32, 512))
    greedy = temps < GREEDY_TEMPERATURE
    assert torch.equal(out[greedy.to(DEVICE)], logits.argmax(-1)[greedy.to(DEVICE)])
    sampled = out[~greedy.to(DEVICE)]
    assert (sampled < 300).all() and (sampled != logits.argmax(-1)[~greedy.to(DEVICE)]).sum() >= 12


# ---------------------------------------------------------------- sampled rows: softmax(logits / T)

def test_draws_follow_the_tempered_softmax():
    temps = (0.5, 1.0, 1.7)
    logits = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 1.5
    logits[11] = float("-inf")
    batch = logits.to(DEVICE).expand(NUM_DRAWS * len(temps), -1)  # stride 0: every row reads the same logits
    out = draw(batch, torch.tensor(temps).repeat_interleave(NUM_DRAWS), seed=42, tile=(1024, 16)).cpu().numpy()
    for i, temperature in enumerate(temps):
        counts = np.bincount(out[i * NUM_DRAWS:(i + 1) * NUM_DRAWS], minlength=16)
        probs = tempered_softmax(logits, temperature)
        assert counts[11] == 0, "drew a banned token"
        assert np.abs(counts / NUM_DRAWS - probs).max() < 0.015, temperature
        p_value = chi_square_p_value(counts[probs > 0], probs[probs > 0])
        assert p_value > 1e-3, f"T={temperature}: chi-square p = {p_value:.2g}"


def test_tokens_do_not_depend_on_the_tiling():
    """Token v of row r takes its uniform from (seed, r, v) alone, so chunking changes nothing: this is
    how the multi-chunk reduction is checked against one chunk per row, draws included."""
    logits = torch.randn(4, 700, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    temps = [0.7, 0.0, 1.3, 1.0]
    whole = draw(logits, temps, tile=(4, 1024))
    for tile in [(4, 16), (2, 64), (1, 256), None]:
        assert torch.equal(draw(logits, temps, tile=tile), whole), tile
    assert torch.equal(draw(logits[:2], temps[:2]), whole[:2]), "a row's draw depends on the rows after it"


# ---------------------------------------------------------------- the seed: from the generator, fresh each call

def test_same_generator_state_same_tokens_and_fresh_draws_each_call():
    logits = torch.zeros(64, 256, device=DEVICE)
    temps = [1.0] * 64
    assert torch.equal(draw(logits, temps, seed=8), draw(logits, temps, seed=8))
    assert not torch.equal(draw(logits, temps, seed=8), draw(logits, temps, seed=9))
    generator = torch.Generator(device=DEVICE).manual_seed(8)
    first, second = draw(logits, temps, None, generator=generator), draw(logits, temps, None, generator=generator)
    assert torch.equal(first, draw(logits, temps, seed=8)) and (first != second).float().mean() > 0.9
    assert len(set(first.tolist())) > 45
    torch.manual_seed(5)
    default = draw(logits, temps, None)  # generator None: the device's default generator
    torch.manual_seed(5)
    assert torch.equal(default, draw(logits, temps, None))


# ---------------------------------------------------------------- Sampler.sample: the fused path only when it should

def sampler_params(n: int, temperature, top_p=1.0, top_k=-1, min_p=0.0, seeded=()):
    col = lambda v, dt: torch.as_tensor(v if isinstance(v, list) else [v] * n, dtype=dt, device=DEVICE)  # noqa: E731
    has_seed = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    has_seed[list(seeded)] = True
    return dict(temperature=col(temperature, torch.float32), top_p=col(top_p, torch.float32),
                top_k=col(top_k, torch.int32), min_p=col(min_p, torch.float32),
                seed=torch.arange(n, device=DEVICE) * 31 + 7, has_seed=has_seed,
                positions=torch.full((n,), 3, dtype=torch.int64, device=DEVICE))


def plan_of(p: dict, vocab: int):
    host = lambda t: t.cpu().numpy()  # noqa: E731
    return plan_sampling(host(p["temperature"]), host(p["top_p"]), host(p["top_k"]), host(p["min_p"]),
                         host(p["has_seed"]), vocab, lambda rows: torch.from_numpy(rows).to(DEVICE))


@pytest.fixture
def fused_calls(monkeypatch):
    """Lets Sampler.sample take the fused path on this device (under the interpreter on CPU); counts its calls."""
    calls = []
    real = fused_sample.sample
    monkeypatch.setattr(fused_sample, "enabled_for", lambda logits: True)
    monkeypatch.setattr(fused_sample, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sampler_module, "fused_sample", fused_sample)
    return calls


def torch_path(logits, p, seed, plan=None):
    saved = sampler_module.fused_sample
    sampler_module.fused_sample = None
    try:
        return Sampler().sample(logits, **p, generator=torch.Generator(device=DEVICE).manual_seed(seed), plan=plan)
    finally:
        sampler_module.fused_sample = saved


@pytest.mark.parametrize("with_plan", [True, False])
def test_sampler_takes_the_fused_path_for_temperature_only_batches(fused_calls, with_plan):
    logits = torch.zeros(32, 256, device=DEVICE)
    p = sampler_params(32, [0.8, 0.0, 1.0, 1.2] * 8)
    plan = plan_of(p, 256) if with_plan else None
    out = Sampler().sample(logits, **p, generator=torch.Generator(device=DEVICE).manual_seed(3), plan=plan)
    assert len(fused_calls) == 1
    assert torch.equal(out, draw(logits, p["temperature"], seed=3))
    assert not torch.equal(out, torch_path(logits, p, 3)), "the fused and torch paths should draw differently"


@pytest.mark.parametrize("case", ["seeded row", "top_p row", "top_k row", "min_p row", "penalties", "all greedy"])
def test_sampler_sends_only_penalised_batches_to_the_fused_tail(fused_calls, monkeypatch, case):
    """Only temperature-only batches take fused_sample, only batches with penalties the fused tail; the rest
    keep the torch path (an all-greedy batch without penalties: torch's argmax)."""
    n, vocab = 8, 200
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    temps = [0.0] * n if case == "all greedy" else [0.9, 0.0, 1.1, 0.7] * 2
    top_p = [1.0] * n
    top_p[0] = 0.8 if case == "top_p row" else 1.0
    top_k = [-1] * n
    top_k[2] = 20 if case == "top_k row" else -1
    min_p = [0.0] * n
    min_p[3] = 0.1 if case == "min_p row" else 0.0
    p = sampler_params(n, temps, top_p, top_k, min_p, seeded=[4] if case == "seeded row" else ())
    penalties = None
    if case == "penalties":  # greedy row 5: its best token, 2, seen in the output, falls below token 9
        logits[5, [2, 9]] = torch.tensor([4.0, 3.9], device=DEVICE)
        state = PenaltyState(4, vocab, torch.device(DEVICE))
        state.reset(np.array([2]))
        state.observe(torch.tensor([1, 2, 2], device=DEVICE), np.full(3, 2), np.array([True, False, False]))
        one = lambda v: torch.tensor([v], device=DEVICE)  # noqa: E731
        penalties = RowPenalties(state, one(5), one(2), dict(repetition_penalty=one(3.0), presence_penalty=one(0.5),
                                                             frequency_penalty=one(0.1)))
    tail = kernel_module("dataplane.sampling.fused_tail")
    real_tail, tail_calls = tail.sample, []
    monkeypatch.setattr(tail, "enabled_for", lambda logits: True)
    monkeypatch.setattr(tail, "sample", lambda *a, **k: tail_calls.append(1) or real_tail(*a, **k))
    monkeypatch.setattr(sampler_module, "fused_tail", tail)
    out = Sampler().sample(logits, **p, generator=torch.Generator(device=DEVICE).manual_seed(11),
                           plan=plan_of(p, vocab), penalties=penalties)
    assert fused_calls == [] and len(tail_calls) == (1 if case == "penalties" else 0)
    if case not in ("penalties", "all greedy"):
        assert torch.equal(out, torch_path(logits, p, 11, plan_of(p, vocab)))
    greedy = (p["temperature"] < GREEDY_TEMPERATURE).cpu()
    best = logits.argmax(-1)
    if case == "penalties":
        assert best[5] == 2 and out[5] == 9
        best[5] = 9
    assert torch.equal(out[greedy], best[greedy]) and ((out >= 0) & (out < vocab)).all()


# ---------------------------------------------------------------- GPU: Qwen3's vocabulary, batch 256, bf16

@gpu
def test_gpu_qwen3_vocab_greedy_exact_and_reproducible():
    logits = 3.0 * torch.randn(256, QWEN3_VOCAB, generator=torch.Generator().manual_seed(7))
    logits = logits.to("cuda", torch.bfloat16)
    for row, ids in enumerate([[8191, 8192], [1023, 1024], [QWEN3_VOCAB - 1], [4096, 151000], [3, 1]]):
        logits[row, ids] = 40.0
    temps = torch.tensor([0.0, 0.6] * 128)
    greedy = (temps < GREEDY_TEMPERATURE).cuda()
    out = draw(logits, temps, seed=1)
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])
    assert out.tolist()[0] == 8191 and out.tolist()[2] == QWEN3_VOCAB - 1 and out.tolist()[4] == 1
    assert ((out >= 0) & (out < QWEN3_VOCAB)).all()
    assert torch.equal(out, draw(logits, temps, seed=1)) and not torch.equal(out, draw(logits, temps, seed=2))
    assert torch.equal(draw(logits[:1], temps[:1], seed=1), out[:1])
    on_cpu = lambda: draw(logits, temps, None, generator=torch.Generator().manual_seed(4))  # noqa: E731
    assert torch.equal(on_cpu(), on_cpu()), "a CPU generator with CUDA logits: draw there, move the seed"


@gpu
def test_gpu_qwen3_vocab_draws_follow_the_tempered_softmax():
    hot = [0, 4095, 4096, 8191, 8192, 75_000, QWEN3_VOCAB - 2, QWEN3_VOCAB - 1]  # chunk and word boundaries
    logits = torch.randn(QWEN3_VOCAB, generator=torch.Generator().manual_seed(8)) - 5.0
    logits[hot] = torch.tensor([4.0, 3.5, 3.0, 2.5, 3.8, 2.0, 3.2, 2.8])
    logits = logits.to(torch.bfloat16)
    # buckets: each hot token, then the rest by 8192-token span, so that every chunk must take part
    bucket = len(hot) + np.arange(QWEN3_VOCAB) // 8192
    bucket[hot] = np.arange(len(hot))
    generator = torch.Generator(device="cuda").manual_seed(21)
    for temperature in (0.6, 1.0):
        draws = torch.cat([draw(logits.cuda().expand(256, -1), [temperature] * 256, None, generator=generator)
                           for _ in range(40)]).cpu().numpy()
        counts = np.bincount(bucket[draws], minlength=bucket.max() + 1)
        expected = np.bincount(bucket, weights=tempered_softmax(logits.float(), temperature))
        assert expected[len(hot):].sum() > 0.05 and (expected * len(draws)).min() > 5
        p_value = chi_square_p_value(counts, expected)
        assert p_value > 1e-3, f"T={temperature}: chi-square p = {p_value:.2g}"


@gpu
def test_gpu_sampler_fused_for_plain_batches_torch_for_seeded(monkeypatch):
    monkeypatch.delenv(fused_ops.DISABLE_ENV, raising=False)
    logits = torch.randn(256, QWEN3_VOCAB, generator=torch.Generator().manual_seed(9)).to("cuda", torch.bfloat16)
    p = sampler_params(256, 0.6)
    generator = lambda: torch.Generator(device="cuda").manual_seed(5)  # noqa: E731
    out = Sampler().sample(logits, **p, generator=generator(), plan=plan_of(p, QWEN3_VOCAB))
    assert torch.equal(out, draw(logits, p["temperature"], seed=5))
    p = sampler_params(256, 0.6, seeded=[0, 100])
    plan = plan_of(p, QWEN3_VOCAB)
    out = Sampler().sample(logits, **p, generator=generator(), plan=plan)
    monkeypatch.setenv(fused_ops.DISABLE_ENV, "1")
    assert torch.equal(out, Sampler().sample(logits, **p, generator=generator(), plan=plan))


@gpu
def test_gpu_benchmark_torch_path_against_fused(monkeypatch, capsys):
    """Prints µs per call at [256, 151936]; asserts nothing about time."""
    p = sampler_params(256, 0.6)
    plan = plan_of(p, QWEN3_VOCAB)
    generator = torch.Generator(device="cuda").manual_seed(0)
    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(256, QWEN3_VOCAB, device="cuda").to(dtype)
        for name, disabled in (("torch", "1"), ("fused", "0")):
            monkeypatch.setenv(fused_ops.DISABLE_ENV, disabled)
            run = lambda x=logits: Sampler().sample(x, **p, generator=generator, plan=plan)  # noqa: E731
            for _ in range(3):
                run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                run()
            end.record()
            torch.cuda.synchronize()
            lines.append(f"sample [256, {QWEN3_VOCAB}] {str(dtype)[6:]:>8} {name:>5}: "
                         f"{start.elapsed_time(end) / 20 * 1000:7.1f} us")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
