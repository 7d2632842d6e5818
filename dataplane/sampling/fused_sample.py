"""Fused sampling for the common case: temperature only (no min-p, top-k or top-p), unseeded.

The Gumbel-max trick, argmax_v(logits_v / T - log(-log u_v)), samples exactly from
softmax(logits / T), the distribution of sampler.py's exponential race, in one pass over
the logits in their own dtype: no fp32 copy, no softmax, no [N, V] noise. It is computed
in base 2 (scaled by log2(e), which moves no argmax). u_v is a word of Philox keyed by a
seed that the runner's generator draws on the device each call, so nothing waits on the
host and the same generator state gives the same tokens, whatever the chunking. Greedy
rows (temperature below sampler.GREEDY_TEMPERATURE) take the argmax of the raw logits.
The grid is (row tile, vocab chunk), so one row of a 152k vocabulary still fills the GPU;
each program writes its chunk's best (score, token id) and a second small kernel picks each
row's best chunk. Ties go to the lowest token id, as with torch.argmax. Sampler.sample calls
`sample` for CUDA logits when no row is filtered or seeded (NANOPLANE_DISABLE_FUSED_OPS=1
turns it off); tests/dataplane/test_fused_sample.py checks it against the torch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataplane.layers.fused_ops import enabled_for  # noqa: F401  (Sampler.sample asks it)


@triton.jit
def _quarter_best(logits_ptr, stride_row, rows64, row_ok, first, offs, vocab_size, bits, scale, greedy):
    """Best (score, token id) per row among the tokens first + 4 * offs, whose random words are bits."""
    cols = first + 4 * offs
    mask = row_ok[:, None] & (cols < vocab_size)[None, :]
    x = tl.load(logits_ptr + rows64[:, None] * stride_row + cols[None, :], mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    # the top 24 bits: u on the grid k * 2^-24, exact in fp32; the clamp keeps both logs finite
    u = tl.maximum((bits >> 8).to(tl.float32) * 5.9604644775390625e-08, 1.1754943508222875e-38)
    score = tl.where(greedy[:, None], x, x * scale[:, None] - tl.log2(-tl.log2(u)))
    score = tl.where(mask, score, float("-inf"))
    best, index = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    return best, first + 4 * index


@triton.jit
def _merge(best, best_id, score, index):
    """The better of two (score, token id), the lower id on a tie, as torch.argmax."""
    take = (score > best) | ((score == best) & (index < best_id))
    return tl.where(take, score, best), tl.where(take, index, best_id)


@triton.jit(do_not_specialize=["num_rows"])
def gumbel_argmax_kernel(
    logits_ptr, stride_row, temperature_ptr, seed_ptr, chunk_score_ptr, chunk_id_ptr,
    num_rows, vocab_size, num_chunks,
    GREEDY_BELOW: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    chunk = tl.program_id(1)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    greedy = temperature < GREEDY_BELOW
    scale = tl.where(greedy, 1.0, 1.4426950408889634 / tl.where(greedy, 1.0, temperature))
    seed = tl.load(seed_ptr)
    # token v of row r takes word v % 4 of Philox(seed; counter v // 4, r, 0, 0): one call serves
    # four tokens, and a token's uniform depends on neither the chunk size nor the batch size
    offs = tl.arange(0, BLOCK_V // 4)
    start = chunk * BLOCK_V
    zeros = tl.zeros([ROWS, BLOCK_V // 4], dtype=tl.int32)
    bits0, bits1, bits2, bits3 = tl.philox(seed, zeros + (start // 4 + offs)[None, :], zeros + rows[:, None], zeros,
                                           zeros)
    best, best_id = _quarter_best(logits_ptr, stride_row, rows64, row_ok, start, offs, vocab_size, bits0, scale, greedy)
    score, index = _quarter_best(logits_ptr, stride_row, rows64, row_ok, start + 1, offs, vocab_size, bits1, scale,
                                 greedy)
    best, best_id = _merge(best, best_id, score, index)
    score, index = _quarter_best(logits_ptr, stride_row, rows64, row_ok, start + 2, offs, vocab_size, bits2, scale,
                                 greedy)
    best, best_id = _merge(best, best_id, score, index)
    score, index = _quarter_best(logits_ptr, stride_row, rows64, row_ok, start + 3, offs, vocab_size, bits3, scale,
                                 greedy)
    best, best_id = _merge(best, best_id, score, index)
    out = rows64 * num_chunks + chunk
    tl.store(chunk_score_ptr + out, best, mask=row_ok)
    tl.store(chunk_id_ptr + out, best_id.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["num_rows"])
def pick_chunk_kernel(chunk_score_ptr, chunk_id_ptr, out_ptr, num_rows, num_chunks,
                      ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    chunks = tl.arange(0, BLOCK_C)
    scores = tl.load(chunk_score_ptr + rows64[:, None] * num_chunks + chunks[None, :],
                     mask=row_ok[:, None] & (chunks < num_chunks)[None, :], other=float("-inf"))
    _, best = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    ids = tl.load(chunk_id_ptr + rows64 * num_chunks + best, mask=row_ok, other=0)
    tl.store(out_ptr + rows, ids, mask=row_ok)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh int64 Philox key from the generator (None: the device's default one), left on the device."""
    draw_on = generator.device if generator is not None else device
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=draw_on, generator=generator).to(device)


def _tile(num_rows: int, vocab_size: int) -> tuple[int, int]:
    """(rows, tokens) per program: chunks of 4k tokens whatever the batch size (so that one
    compiled variant serves a batch shrinking from 256 rows to 1: a new variant would be a
    Triton compile mid-run), several whole rows per program when a row fits in one chunk."""
    whole_row = max(16, triton.next_power_of_2(vocab_size))
    block_v = min(whole_row, 4096)
    rows = min(triton.next_power_of_2(num_rows), max(1, 4096 // block_v)) if block_v == whole_row else 1
    return rows, block_v


def sample(logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator | None, *,
           greedy_below: float, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """logits [N, V] (any float dtype), temperature f32 [N]: one token id per row, int64 [N],
    drawn from softmax(logits / T), or the argmax where T < greedy_below. tile overrides
    _tile's (rows, tokens) per program (powers of two, tokens >= 16), for tests."""
    assert logits.dim() == 2, f"logits must be [N, V], got {tuple(logits.shape)}"
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows, vocab_size = logits.shape
    device = logits.device
    out = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows == 0:
        return out
    temperature = temperature.to(device=device, dtype=torch.float32).contiguous()
    assert temperature.shape == (num_rows,), f"temperature must be [{num_rows}], got {tuple(temperature.shape)}"
    rows, block = tile or _tile(num_rows, vocab_size)
    assert block >= 16 and block & (block - 1) == 0 and rows & (rows - 1) == 0, f"bad tile {(rows, block)}"
    num_chunks = triton.cdiv(vocab_size, block)
    chunk_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=device)
    chunk_id = out if num_chunks == 1 else torch.empty(num_rows, num_chunks, dtype=torch.int64, device=device)
    gumbel_argmax_kernel[(triton.cdiv(num_rows, rows), num_chunks)](
        logits, logits.stride(0), temperature, draw_seed(generator, device), chunk_score, chunk_id,
        num_rows, vocab_size, num_chunks,
        GREEDY_BELOW=greedy_below, ROWS=rows, BLOCK_V=block, num_warps=8 if rows * block >= 4096 else 4)
    if num_chunks > 1:
        block_c = triton.next_power_of_2(num_chunks)
        pick_rows = max(1, 1024 // block_c)
        pick_chunk_kernel[(triton.cdiv(num_rows, pick_rows),)](
            chunk_score, chunk_id, out, num_rows, num_chunks, ROWS=pick_rows, BLOCK_C=block_c, num_warps=4)
    return out
