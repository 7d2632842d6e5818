"""Sampler: one token id per row of the LM head's logits.

Greedy rows (temperature ~0) take the argmax of the logits they are given (raw, or
after penalties and min_tokens: dataplane/sampling/sampling_step.py applies those first). The
others are divided by their temperature, filtered by min-p, top-k and then top-p (vLLM
v1's order) and drawn with the exponential race argmax(p / E), E ~ Exp(1), which samples exactly
from p (the Gumbel-max trick without logs). Unseeded rows draw E from the runner's
generator. A seeded row's E is a counter-based stream: a 32-bit integer hash of
(token id, key) with key = hash64(seed, position), so its tokens do not depend on the
rest of the batch, on scheduling or preemption, or on the device (integer ops give
the same bits on CPU and GPU), and all seeded rows are drawn in one vectorised pass.
The runner calls `sample` after compute_logits, with the params BatchState gathered and
the `SamplerPlan` it decided on the host: which rows are greedy, filtered or seeded, so
nothing here waits on the device (no .tolist(), no nonzero()). Penalties (RowPenalties) are
applied here too, first. On CUDA, a batch with no filtered, seeded or penalised row
(temperature alone, the common case) takes one fused pass instead (fused_sample.py:
Gumbel-max with Philox noise, the same distribution), and a batch with penalties takes the
fused tail (fused_tail.py: penalties, filters and draw in one kernel, on the logits in their own
dtype); the torch code below is the path for the rest, the CPU path and the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dataplane.sampling.penalties import RowPenalties

try:
    from dataplane.sampling import fused_sample, fused_tail
except ModuleNotFoundError as e:  # no Triton: the torch code is the only path
    if e.name != "triton":
        raise
    fused_sample = fused_tail = None

GREEDY_TEMPERATURE = 1e-5
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplerPlan:
    """What `sample` needs to know about its rows before it runs, decided on the host from the
    params (BatchState holds them in numpy), so that sampling never reads the device back."""

    all_greedy: bool
    all_seeded: bool  # every row is greedy or seeded: no draws from the generator
    any_min_p: bool
    filter_rows: torch.Tensor | None  # i64 rows that min-p, top-k or top-p filter; None when no row does
    filter_all: bool  # filter_rows is every row
    seeded_rows: torch.Tensor | None  # i64 rows drawn from their seed; None when none is


@dataclass(slots=True, frozen=True)
class SamplingDecision:
    """A SamplerPlan on the host: its row sets as numpy arrays, before they go to the device."""

    all_greedy: bool
    all_seeded: bool
    any_min_p: bool
    filter_rows: np.ndarray
    filter_all: bool
    seeded_rows: np.ndarray

    def plan(self, as_index: Callable[[np.ndarray], torch.Tensor]) -> SamplerPlan:
        """as_index turns a numpy row set into a device tensor."""
        return SamplerPlan(
            all_greedy=self.all_greedy, all_seeded=self.all_seeded, any_min_p=self.any_min_p,
            filter_rows=as_index(self.filter_rows) if len(self.filter_rows) else None,
            filter_all=self.filter_all,
            seeded_rows=as_index(self.seeded_rows) if len(self.seeded_rows) else None)


def decide_sampling(temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, min_p: np.ndarray,
                    has_seed: np.ndarray, vocab_size: int) -> SamplingDecision:
    """The per-row params as numpy arrays."""
    greedy = temperature.astype(np.float32) < np.float32(GREEDY_TEMPERATURE)
    needs_filter = ~greedy & (((top_k > 0) & (top_k < vocab_size)) | (top_p < 1.0) | (min_p > 0.0))
    seeded = has_seed.astype(bool) & ~greedy
    filter_rows = np.flatnonzero(needs_filter)
    return SamplingDecision(
        all_greedy=bool(greedy.all()), all_seeded=bool((seeded | greedy).all()),
        any_min_p=bool((~greedy & (min_p > 0.0)).any()),
        filter_rows=filter_rows, filter_all=len(filter_rows) == len(greedy), seeded_rows=np.flatnonzero(seeded))


def plan_sampling(temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, min_p: np.ndarray,
                  has_seed: np.ndarray, vocab_size: int, as_index: Callable[[np.ndarray], torch.Tensor]) -> SamplerPlan:
    """The per-row params as numpy arrays; as_index turns a numpy row set into a device tensor."""
    return decide_sampling(temperature, top_p, top_k, min_p, has_seed, vocab_size).plan(as_index)


class Sampler:
    def sample(self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
               seed: torch.Tensor, has_seed: torch.Tensor, positions: torch.Tensor,
               generator: torch.Generator | None = None, min_p: torch.Tensor | None = None,
               plan: SamplerPlan | None = None, penalties: RowPenalties | None = None) -> torch.Tensor:
        """logits [N, V]; per row: temperature f32, top_p f32, top_k i32 (-1 = off),
        seed i64, has_seed bool, positions i64 (index of the token being sampled),
        min_p f32 (0 = off; None = all off). plan: the rows' plan_sampling; without it,
        sample reads the params back to the host to make it (a device sync). penalties: the
        rows that use them (the torch path applies them in place when the logits are float32).
        Returns the sampled ids, int64 [N], on the logits' device."""
        device, vocab_size = logits.device, logits.shape[-1]
        temperature, top_p, top_k = temperature.to(device), top_p.to(device), top_k.to(device)
        min_p = torch.zeros_like(top_p) if min_p is None else min_p.to(device)
        if plan is None:
            host = lambda t: t.cpu().numpy()  # noqa: E731
            plan = plan_sampling(host(temperature), host(top_p), host(top_k), host(min_p), host(has_seed), vocab_size,
                                 lambda rows: torch.from_numpy(rows).to(device))
        if plan.all_greedy and penalties is None:
            return logits.argmax(dim=-1)  # widening bf16 to float32 is exact: the same argmax, one read
        if (penalties is None and plan.filter_rows is None and plan.seeded_rows is None
                and fused_sample is not None and fused_sample.enabled_for(logits)):
            return fused_sample.sample(logits, temperature, generator, greedy_below=GREEDY_TEMPERATURE)
        # the fused tail beats the torch path only where it saves the float32 copy and the penalty ops
        # (benchmarks/sampler_tail.py): filters and seeds alone stay with torch's sort until it is faster
        if penalties is not None and fused_tail is not None and fused_tail.enabled_for(logits):
            # unseeded rows never read their key: without seeded rows, the seeds stand in (no launches)
            seed_keys = mix_seeds(seed.to(device), positions.to(device)) if plan.seeded_rows is not None else seed
            return fused_tail.sample(logits, temperature, top_p, top_k, min_p, has_seed, seed_keys, generator,
                                     greedy_below=GREEDY_TEMPERATURE, penalties=penalties)
        logits = logits.float()
        if penalties is not None:
            penalties.apply_(logits)
            if plan.all_greedy:
                return logits.argmax(dim=-1)
        greedy = temperature < GREEDY_TEMPERATURE
        greedy_ids = logits.argmax(dim=-1)

        scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
        if plan.filter_rows is not None:
            if plan.filter_all:
                scaled = apply_top_k_top_p(apply_min_p(scaled, min_p) if plan.any_min_p else scaled, top_k, top_p)
            else:
                rows = plan.filter_rows
                picked = apply_min_p(scaled[rows], min_p[rows]) if plan.any_min_p else scaled[rows]
                scaled[rows] = apply_top_k_top_p(picked, top_k[rows], top_p[rows])
        probs = scaled.softmax(dim=-1)

        noise = torch.ones_like(probs)  # what greedy rows keep when every other row is seeded
        if not plan.all_seeded:
            noise = _unseeded_noise(probs.shape, device, generator)
        if plan.seeded_rows is not None:
            rows = plan.seeded_rows
            keys = mix_seeds(seed.to(device)[rows], positions.to(device)[rows])
            noise[rows] = seeded_noise(keys, vocab_size, device)
        # Exp(1) can return exactly 0 in float32; 0/0 would be NaN and win the argmax
        noise.clamp_min_(torch.finfo(torch.float32).tiny)
        sampled_ids = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, greedy_ids, sampled_ids)

    __call__ = sample


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens whose probability is below min_p times the most likely
    token's (0 = off). The most likely token always survives."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.float().unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k largest; <= 0 = off) and then top-p (smallest set
    with mass >= p among the survivors; >= 1 = off) drop. Keeps at least one token."""
    num_rows, vocab_size = logits.shape
    # stable: among equal logits the lower id ranks first, as torch.argmax picks it
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab_size, device=logits.device).expand(num_rows, vocab_size)
    k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size).to(torch.long)
    sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), float("-inf"))

    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.where(top_p < 1.0, top_p.float(), float("inf"))
    drop = mass_before >= p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def seeded_noise(keys: list[int] | torch.Tensor, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Exp(1) noise [len(keys), V], element (r, v) a function of (keys[r], v) only.
    keys: 64-bit ints, or an int64 tensor holding their two's complement (mix_seeds).

    A torch.Generator per row would cost milliseconds per row on the CPU (1.1 s a
    step for 256 seeded rows of a 152k vocabulary); this is a few elementwise ops."""
    if isinstance(keys, torch.Tensor):
        keys = keys.to(device)
        halves = torch.stack([keys & _MASK32, _shift_right(keys, 32)], dim=1)
    else:
        halves = torch.tensor([[k & _MASK32, k >> 32] for k in keys], dtype=torch.int64, device=device)
    x = torch.arange(vocab_size, dtype=torch.int64, device=device).expand(len(keys), -1) ^ halves[:, :1]
    x = _hash32_(x)
    x ^= halves[:, 1:]
    x = _hash32_(x)
    # 24 random bits → u in (0, 1); the top value, (2**24 - 0.5) * 2**-24, rounds to 1.0 in float32,
    # whose noise 0 would make that token win: clamped below 1
    u = (x >> 8).to(torch.float32).add_(0.5).mul_(2.0 ** -24).clamp_max_(1.0 - 2.0 ** -24)
    return u.log_().neg_()


def mix_seed(seed: int, position: int) -> int:
    """64-bit hash of (seed, position) (splitmix64 finaliser, chained)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


def mix_seeds(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mix_seed over int64 tensors, on their device, with no host round trip: the
    results are the same 64 bits, held as int64 (two's complement)."""
    return _splitmix64_tensor(_splitmix64_tensor(seeds.long()) ^ positions.long())


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _as_int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_SPLITMIX = [_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits (>> on int64 copies the sign bit)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    # int64 addition and multiplication wrap modulo 2**64 like the uint64 ones
    x = x + _SPLITMIX[0]
    x = (x ^ _shift_right(x, 30)) * _SPLITMIX[1]
    x = (x ^ _shift_right(x, 27)) * _SPLITMIX[2]
    return x ^ _shift_right(x, 31)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), in place on int64 holding 32-bit values: a bijection
    with near-ideal avalanche. Products may wrap int64; their low 32 bits are exact."""
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def _unseeded_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    noise_device = generator.device if generator is not None else device
    noise = torch.empty(shape, dtype=torch.float32, device=noise_device).exponential_(generator=generator)
    return noise.to(device)
