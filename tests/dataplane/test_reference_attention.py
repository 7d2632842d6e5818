"""The torch reference paged attention against a naive dense causal attention."""
from __future__ import annotations

import pytest
import torch

import dataplane.attention as attention_backends
from dataplane.attention import AttentionBackend, available_backends, get_attention_backend, register_backend
from dataplane.attention.reference import paged_attention, store_kv
from dataplane.context import AttentionMetadata

BLOCK_SIZE = 16


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, Hq, D] at the last q_len positions of a context k, v [seq_len, Hkv, D]; float64."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores.masked_fill_(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def build_case(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, *,
               num_blocks: int = 40, pad_tokens: int = 0, seed: int = 0, dtype=torch.float32):
    """seqs: (num_cached, q_len) per sequence. Writes the cached prefixes into a paged cache with
    scattered blocks, and returns what paged_attention needs plus each sequence's dense K/V."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-(c + n) // BLOCK_SIZE) for c, n in seqs)
    tables, slots, dense, qs, ks, vs = [], [], [], [], [], []
    for cached, q_len in seqs:
        seq_len = cached + q_len
        table = [free.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        seq_slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len)]
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        prefix = torch.tensor(seq_slots[:cached], dtype=torch.long)
        k_cache.view(-1, num_kv_heads, head_dim)[prefix] = k[:cached]
        v_cache.view(-1, num_kv_heads, head_dim)[prefix] = v[:cached]
        qs.append(torch.randn(q_len, num_heads, head_dim, generator=g).to(dtype))
        ks.append(k[cached:])
        vs.append(v[cached:])
        slots += seq_slots[cached:]
        tables.append(table + [-1] * (width - len(table)))  # unused entries are arbitrary
        dense.append((k, v))
    q_lens = [n for _, n in seqs]
    query_start_loc = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    seq_lens = [c + n for c, n in seqs]
    pad = lambda t: torch.cat([t, torch.zeros(pad_tokens, *t.shape[1:], dtype=t.dtype)])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return pad(torch.cat(qs)), pad(torch.cat(ks)), pad(torch.cat(vs)), k_cache, v_cache, meta, dense


def check(seqs, num_heads, num_kv_heads, head_dim, *, use_cpu_lists=True, pad_tokens=0, dtype=torch.float32, atol=1e-5):
    q, k, v, k_cache, v_cache, meta, dense = build_case(seqs, num_heads, num_kv_heads, head_dim,
                                                        pad_tokens=pad_tokens, dtype=dtype)
    if not use_cpu_lists:
        meta.query_start_loc_cpu = meta.seq_lens_cpu = None
    scale = head_dim ** -0.5
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    starts = meta.query_start_loc.tolist()
    for i, (k_seq, v_seq) in enumerate(dense):
        expected = naive_attention(q[starts[i]:starts[i + 1]], k_seq, v_seq, scale)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected, atol=atol, rtol=0)
    assert torch.all(out[starts[-1]:] == 0)


MIXED = [(0, 40), (37, 13), (16, 1), (32, 1), (0, 1), (5, 27), (70, 1)]


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_mixed_prefill_chunks_and_decodes(group, head_dim):
    check(MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_only_batch(group):
    check([(15, 1), (16, 1), (47, 1), (0, 1)], num_heads=2 * group, num_kv_heads=2, head_dim=16)


def test_single_prefill_from_scratch_across_blocks():
    check([(0, 50)], num_heads=4, num_kv_heads=1, head_dim=64)


def test_without_cpu_lists_reads_device_tensors():
    check(MIXED, num_heads=4, num_kv_heads=2, head_dim=16, use_cpu_lists=False)


@pytest.mark.parametrize("seqs", [MIXED, [(20, 1), (3, 1)]], ids=["mixed", "decode"])
def test_padding_tokens_are_skipped_and_zeroed(seqs):
    check(seqs, num_heads=4, num_kv_heads=2, head_dim=16, pad_tokens=3)


def test_bf16_computes_in_fp32_and_returns_bf16():
    check(MIXED, num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, atol=2e-2)


def test_store_kv_skips_slot_minus_one():
    k_cache = torch.full((4, BLOCK_SIZE, 2, 8), 7.0)
    v_cache = torch.full_like(k_cache, 7.0)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 40, -1]))
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[40], k[2]) and torch.equal(flat_v[40], v[2])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[[5, 40]] = False
    assert torch.all(flat_k[untouched] == 7.0) and torch.all(flat_v[untouched] == 7.0)


def test_backend_registry(monkeypatch):
    monkeypatch.setattr(attention_backends, "_BACKENDS", dict(attention_backends._BACKENDS))
    assert "torch" in available_backends()
    assert get_attention_backend("torch").forward is paged_attention
    with pytest.raises(ValueError, match="attention backend .nope. is not available here; available: .*torch"):
        get_attention_backend("nope")
    register_backend(AttentionBackend("test-backend", store_kv, paged_attention))
    assert get_attention_backend("test-backend").store_kv is store_kv
    assert {"test-backend", "torch"} <= set(available_backends())
