"""The sampling tail in one kernel on CUDA: penalties, temperature, min-p, top-k, top-p and the draw.

sampler.py's torch path sorts the whole vocabulary for top-k/top-p and needs float32 logits with the
penalties applied as [R, V] tensor ops. Here one program owns one row and makes a few passes over
its logits in their own dtype, recomputing the penalised, tempered value z of each token on the fly:
1. stats: the row's max M, argmax (greedy rows stop here) and sum of exp(z - M); on penalty rows it
   reads the PenaltyState row (prompt_mask, output_counts at the row's slot) once and packs which
   tokens were seen into a bitmask, so later passes load a count only where a bit is set;
2. min-p keeps exp(z - M) >= min_p, the same set as the torch path's probs >= max(probs) * min_p;
3. top-k, then top-p, by a search for a threshold over values instead of a sort: each pass probes
   PROBES values at once (the float's bits as an ordered integer key), counts the candidates at or
   above each (top-k) or sums their exp(z - M) (top-p), and narrows the interval holding the cut to
   the keys present between two probes; it ends on the exact value of the last kept token. At most
   12 passes a filter at 8 probes; a bf16 row has a few thousand distinct values: 5 in practice. Why this
   rather than FlashInfer's pivot rejection: the kept set comes out explicit (threshold, ties), so it
   can be checked token for token against the sort, and the number of passes is bounded, not random;
4. draw: the exponential race (Gumbel-max) over the kept tokens, noise from Philox for unseeded rows
   and from sampler.py's integer hash stream (seeded_noise) for seeded ones.
Ties at a cut keep the lowest ids first, as the torch path's stable sort: the last pass counts the
tied tokens in id order. Sums run in a different order than torch's softmax and cumsum, so a token
whose probability lies within float32 rounding of a min-p or top-p boundary may fall on the other
side; nothing else differs. Penalties and temperature round as the torch code (division, no fused
multiply-add). Nothing waits on the host. Sampler.sample calls `sample` for CUDA logits when a batch
has penalties (with filters and seeds alone, one program per row is slower than torch's sort);
tests/dataplane/test_fused_tail.py checks it against sampler.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.layers.fused_ops import enabled_for  # noqa: F401  (Sampler.sample asks it)
from dataplane.sampling.fused_sample import draw_seed
from dataplane.sampling.penalties import RowPenalties

KEY_OF_MINUS_INF = tl.constexpr(-2139095041)  # _key(-inf): below every finite value's key
KEY_MAX = tl.constexpr(2**31 - 1)
# tokens a program reads at once, keys probed per search pass, warps: benchmarks/sampler_tail.py --sweep times others
DEFAULT_BLOCK_V, DEFAULT_PROBES, DEFAULT_NUM_WARPS = 1024, 8, 16
BITS_PER_WORD = 32  # tokens per word of the seen-token bitmask
BITS = tl.constexpr(BITS_PER_WORD)


@triton.jit
def _key(z):
    """A float32 as an int32 that orders as the float does (-0.0 and 0.0 tie, as they compare equal)."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _value(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _tempered(row_logits, start, vocab_size, row_seen, row_counts, row_prompt, has_penalty, rep, presence,
              frequency, divisor, DENSE: tl.constexpr, HAS_PENALTIES: tl.constexpr, BLOCK_V: tl.constexpr):
    """(token ids, in the vocabulary, penalised logits, penalised / divisor) of the chunk at start, as
    penalties.apply_penalties and Sampler.sample compute them. DENSE: read the PenaltyState row and
    write the seen bitmask; otherwise read the bitmask and load counts only where a token was seen."""
    cols = start + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    words_at = row_seen + start // BITS + tl.arange(0, BLOCK_V // BITS)
    x = tl.load(row_logits + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
    if HAS_PENALTIES:
        on = in_vocab & has_penalty
        if DENSE:
            count = tl.load(row_counts + cols, mask=on, other=0)
            seen = (tl.load(row_prompt + cols, mask=on, other=0) != 0) | (count > 0)
            shifts = tl.arange(0, BITS)
            words = tl.sum(tl.reshape(seen.to(tl.int32), [BLOCK_V // BITS, BITS]) << shifts[None, :], axis=1)
            tl.store(words_at, words)
        else:
            words = tl.load(words_at)
            seen = tl.reshape((words[:, None] >> tl.arange(0, BITS)[None, :]) & 1, [BLOCK_V]) != 0
            count = tl.load(row_counts + cols, mask=on & seen, other=0)
        x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
        x = x - frequency * count.to(tl.float32) - presence * (count > 0).to(tl.float32)
    return cols, in_vocab, x, tl.math.div_rn(x, divisor)


@triton.jit
def _probe_pass(row_logits, row_seen, row_counts, row_prompt, has_penalty, rep, presence, frequency, divisor,
                vocab_size: tl.constexpr, row_max, min_p, probes,
                HAS_PENALTIES: tl.constexpr, BLOCK_V: tl.constexpr, PROBES: tl.constexpr):
    """For each probe key (int32): of the min-p candidates, how many have a key at or above it, their sum
    of exp(z - M) and their smallest key, and the largest key below it."""
    counts = tl.zeros([PROBES], dtype=tl.int32)
    masses = tl.zeros([PROBES], dtype=tl.float32)
    smallest_at_or_above = tl.full([PROBES], KEY_MAX, tl.int32)
    largest_below = tl.full([PROBES], KEY_OF_MINUS_INF, tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        _, in_vocab, _, z = _tempered(row_logits, start, vocab_size, row_seen, row_counts, row_prompt, has_penalty,
                                      rep, presence, frequency, divisor, False, HAS_PENALTIES, BLOCK_V)
        e = tl.exp(z - row_max)
        candidate = in_vocab & (z > float("-inf")) & (e >= min_p)
        keys = _key(z)
        at_or_above = keys[:, None] >= probes[None, :]
        counted = candidate[:, None] & at_or_above
        counts += tl.sum(counted.to(tl.int32), axis=0)
        masses += tl.sum(tl.where(counted, e[:, None], 0.0), axis=0)
        smallest_at_or_above = tl.minimum(smallest_at_or_above,
                                          tl.min(tl.where(counted, keys[:, None], KEY_MAX), axis=0))
        largest_below = tl.maximum(largest_below, tl.max(
            tl.where(candidate[:, None] & ~at_or_above, keys[:, None], KEY_OF_MINUS_INF), axis=0))
    return counts, masses, smallest_at_or_above, largest_below


@triton.jit
def _search(row_logits, row_seen, row_counts, row_prompt, has_penalty, rep, presence, frequency, divisor,
            vocab_size: tl.constexpr, row_max, min_p, low, high, target,
            BY_MASS: tl.constexpr, HAS_PENALTIES: tl.constexpr, BLOCK_V: tl.constexpr, PROBES: tl.constexpr):
    """The largest key in [low, high) whose candidates at or above it reach target (their count, or BY_MASS
    their sum of exp(z - M)), given that low's do and high's do not; and the count and mass of those above
    it. Each pass probes PROBES keys from low to high, then narrows to the keys present in the bucket that
    holds the answer, so a row of few distinct values (bf16 logits) needs few passes."""
    count_above = tl.zeros([], dtype=tl.int32)
    mass_above = tl.zeros([], dtype=tl.float32)
    index = tl.arange(0, PROBES)
    while high - low > 1:
        step = (high - low + PROBES - 2) // (PROBES - 1)
        probes = tl.minimum(low + step * index.to(tl.int64), high).to(tl.int32)  # probes[-1] is high
        counts, masses, smallest, largest = _probe_pass(
            row_logits, row_seen, row_counts, row_prompt, has_penalty, rep, presence, frequency, divisor, vocab_size,
            row_max, min_p, probes, HAS_PENALTIES, BLOCK_V, PROBES)
        if BY_MASS:
            reached = masses >= target
        else:
            reached = counts.to(tl.float32) >= target
        # reached is a prefix: probes[0] (low) in it, high not; the answer lies in [probes[j - 1], probes[j])
        j = tl.minimum(tl.maximum(tl.sum(reached.to(tl.int32), axis=0), 1), PROBES - 1)
        low = tl.sum(tl.where(index == j - 1, smallest, 0), axis=0).to(tl.int64)
        high = tl.sum(tl.where(index == j, largest, 0), axis=0).to(tl.int64) + 1
        count_above = tl.sum(tl.where(index == j, counts, 0), axis=0)
        mass_above = tl.sum(tl.where(index == j, masses, 0.0), axis=0)
    return low, count_above, mass_above


@triton.jit
def _hash32(x):
    """sampler._hash32_ (lowbias32) on int64 holding 32-bit values; products wrap, their low 32 bits are exact."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


@triton.jit
def sample_tail_kernel(
    logits_ptr, stride_row, temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, has_seed_ptr, seed_key_ptr,
    philox_seed_ptr, penalty_slot_ptr, prompt_ptr, counts_ptr, state_stride, rep_ptr, presence_ptr, frequency_ptr,
    seen_ptr, seen_stride, out_ptr, kept_ptr, penalised_ptr,
    vocab_size: tl.constexpr, GREEDY_BELOW: tl.constexpr, HAS_PENALTIES: tl.constexpr, WRITE_KEPT: tl.constexpr,
    BLOCK_V: tl.constexpr, PROBES: tl.constexpr,
):
    row = tl.program_id(0)
    row_logits = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature < GREEDY_BELOW
    divisor = tl.where(greedy, 1.0, temperature)
    row_seen = seen_ptr + row.to(tl.int64) * seen_stride
    slot = tl.load(penalty_slot_ptr + row)
    has_penalty = slot >= 0
    row_counts = counts_ptr + tl.maximum(slot, 0) * state_stride
    row_prompt = prompt_ptr + tl.maximum(slot, 0) * state_stride
    rep = tl.load(rep_ptr + row)
    presence = tl.load(presence_ptr + row)
    frequency = tl.load(frequency_ptr + row)

    # 1. stats: max, argmax (lowest id on ties), sum of exp(z - max), online
    row_max = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    best_id = tl.zeros([], dtype=tl.int32)
    num_finite = tl.zeros([], dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        _, _, _, z = _tempered(row_logits, start, vocab_size, row_seen, row_counts, row_prompt, has_penalty, rep,
                               presence, frequency, divisor, True, HAS_PENALTIES, BLOCK_V)
        chunk_max, chunk_arg = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_id = tl.where(chunk_max > row_max, start + chunk_arg, best_id)
        new_max = tl.maximum(row_max, chunk_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        total = total * tl.exp(row_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
        row_max = new_max
        num_finite += tl.sum((z > float("-inf")).to(tl.int32), axis=0)

    token = best_id
    if temperature >= GREEDY_BELOW:
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        # the kept set: candidates (finite, min-p) whose key > cut, or == cut among the first `ties` in id order
        cut = tl.full([], KEY_OF_MINUS_INF, tl.int64)
        ties = tl.full([], 0, tl.int64)
        num_candidates = num_finite.to(tl.int64)
        kept_mass = total
        if (min_p > 0.0) & (((top_k > 0) & (top_k < vocab_size)) | (top_p < 1.0)):
            probes = tl.full([PROBES], KEY_OF_MINUS_INF + 1, tl.int32)
            counts, masses, _, _ = _probe_pass(row_logits, row_seen, row_counts, row_prompt, has_penalty, rep,
                                               presence, frequency, divisor, vocab_size, row_max, min_p, probes,
                                               HAS_PENALTIES, BLOCK_V, PROBES)
            num_candidates = tl.max(counts, axis=0).to(tl.int64)
            kept_mass = tl.max(masses, axis=0)
        # 3a. top-k: the largest key with at least k candidates at or above it
        if (top_k > 0) & (top_k.to(tl.int64) < num_candidates):
            low, count_above, mass_above = _search(
                row_logits, row_seen, row_counts, row_prompt, has_penalty, rep, presence, frequency, divisor,
                vocab_size, row_max, min_p, cut, _key(row_max).to(tl.int64) + 1, top_k.to(tl.float32),
                False, HAS_PENALTIES, BLOCK_V, PROBES)
            cut = low
            ties = top_k.to(tl.int64) - count_above.to(tl.int64)
            kept_mass = mass_above + ties.to(tl.float32) * tl.exp(_value(low.to(tl.int32)) - row_max)
        # 3b. top-p over what top-k kept: the largest key whose mass at or above it reaches top_p * kept_mass
        if top_p < 1.0:
            target = top_p * kept_mass
            low, _, mass_above = _search(
                row_logits, row_seen, row_counts, row_prompt, has_penalty, rep, presence, frequency, divisor,
                vocab_size, row_max, min_p, cut, _key(row_max).to(tl.int64) + 1, target,
                True, HAS_PENALTIES, BLOCK_V, PROBES)
            # tied tokens at the cut are kept while the mass before them (in id order) is below the target
            tie_mass = tl.exp(_value(low.to(tl.int32)) - row_max)
            needed = tl.minimum(tl.ceil((target - mass_above) / tie_mass), vocab_size * 1.0)
            needed = tl.maximum(needed, 1.0).to(tl.int64)
            ties = tl.where(low == cut, tl.minimum(ties, needed), needed)
            cut = low

        # 4. the race among the kept tokens
        seeded = tl.load(has_seed_ptr + row) != 0
        seed_key = tl.load(seed_key_ptr + row)
        key_low = seed_key & 0xFFFFFFFF
        key_high = (seed_key >> 32) & 0xFFFFFFFF
        philox_seed = tl.load(philox_seed_ptr)
        best = tl.full([], float("-inf"), tl.float32)
        token = tl.zeros([], dtype=tl.int32)
        ties_before = tl.zeros([], dtype=tl.int64)
        for start in range(0, vocab_size, BLOCK_V):
            cols, in_vocab, x, z = _tempered(row_logits, start, vocab_size, row_seen, row_counts, row_prompt,
                                             has_penalty, rep, presence, frequency, divisor, False, HAS_PENALTIES,
                                             BLOCK_V)
            candidate = in_vocab & (z > float("-inf")) & (tl.exp(z - row_max) >= min_p)
            keys = _key(z).to(tl.int64)
            tied = candidate & (keys == cut)
            tie_rank = ties_before + tl.cumsum(tied.to(tl.int64), axis=0) - tied.to(tl.int64)
            kept = candidate & ((keys > cut) | (tied & (tie_rank < ties)))
            ties_before += tl.sum(tied.to(tl.int64), axis=0)
            if seeded:
                bits = _hash32(_hash32(cols.to(tl.int64) ^ key_low) ^ key_high) >> 8
            else:
                zeros = tl.zeros([BLOCK_V], dtype=tl.int32)
                philox_bits, _, _, _ = tl.philox(philox_seed, cols, zeros + row, zeros, zeros)
                bits = (philox_bits >> 8).to(tl.int64)
            # 24 random bits -> u in (0, 1), clamped below 1 as seeded_noise does; noise = -log(u) ~ Exp(1)
            u = tl.minimum((bits.to(tl.float32) + 0.5) * 5.9604644775390625e-08, 1.0 - 5.9604644775390625e-08)
            score = tl.where(kept, z - tl.log(-tl.log(u)), float("-inf"))
            chunk_best, chunk_arg = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            token = tl.where(chunk_best > best, start + chunk_arg, token)
            best = tl.maximum(best, chunk_best)
            if WRITE_KEPT:
                out = row.to(tl.int64) * vocab_size + cols
                tl.store(kept_ptr + out, kept.to(tl.int8), mask=in_vocab)
                tl.store(penalised_ptr + out, x, mask=in_vocab)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, has_seed: torch.Tensor, seed_keys: torch.Tensor, generator: torch.Generator | None, *,
           greedy_below: float, penalties: RowPenalties | None = None, block_v: int = DEFAULT_BLOCK_V,
           probes: int = DEFAULT_PROBES, num_warps: int = DEFAULT_NUM_WARPS, write_kept: bool = False):
    """logits [N, V] (any float dtype); per row: temperature, top_p, min_p f32, top_k i32 (<= 0 or >= V: off),
    has_seed bool, seed_keys i64 (sampler.mix_seeds of the seeded rows, anything elsewhere). penalties: the
    rows that use them. Returns the sampled ids, int64 [N]; with write_kept also the kept set (bool [N, V],
    of rows that are not greedy) and the penalised logits (f32 [N, V], the same rows), for tests."""
    assert logits.dim() == 2, f"logits must be [N, V], got {tuple(logits.shape)}"
    assert block_v >= BITS_PER_WORD and block_v & (block_v - 1) == 0 and probes >= 2 and probes & (probes - 1) == 0
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows, vocab_size = logits.shape
    device = logits.device
    out = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows == 0:
        return (out, None, None) if write_kept else out
    column = lambda t, dtype: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    use_penalties = penalties is not None and penalties.state.allocated
    if use_penalties:
        slots, rep, presence, frequency = penalties.per_row(num_rows)
        prompt_mask, counts = penalties.state.prompt_mask.view(torch.uint8), penalties.state.output_counts
        state_stride = counts.stride(0)
    else:
        slots = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
        rep, presence, frequency = (torch.zeros(num_rows, device=device) for _ in range(3))
        prompt_mask, counts, state_stride = out, out, 0  # never read: no row has a slot
    seen_stride = triton.cdiv(vocab_size, block_v) * (block_v // BITS_PER_WORD)
    seen = torch.empty(num_rows, seen_stride, dtype=torch.int32, device=device)
    kept = torch.zeros(num_rows, vocab_size, dtype=torch.int8, device=device) if write_kept else out
    penalised = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device) if write_kept else out
    sample_tail_kernel[(num_rows,)](
        logits, logits.stride(0), column(temperature, torch.float32), column(top_p, torch.float32),
        column(top_k, torch.int32), column(min_p, torch.float32), column(has_seed, torch.int8),
        column(seed_keys, torch.int64), draw_seed(generator, device), slots, prompt_mask, counts, state_stride,
        column(rep, torch.float32), column(presence, torch.float32), column(frequency, torch.float32),
        seen, seen_stride, out, kept, penalised,
        vocab_size=vocab_size, GREEDY_BELOW=greedy_below, HAS_PENALTIES=use_penalties, WRITE_KEPT=write_kept,
        BLOCK_V=block_v, PROBES=probes, num_warps=num_warps,
        enable_fp_fusion=False)  # products and sums round as in the torch code
    return (out, kept.bool(), penalised) if write_kept else out
