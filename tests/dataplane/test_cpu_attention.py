"""The "cpu" attention backend (dataplane/attention/cpu_paged.py) against the torch reference, the oracle."""
from __future__ import annotations

import pytest
import torch

from dataplane.attention import cpu_paged, reference
from tests.dataplane.test_reference_attention import MIXED, build_case


def run_both(seqs, num_heads, num_kv_heads, head_dim, *, pad_tokens=0, dtype=torch.float32, use_cpu_lists=True):
    q, k, v, k_cache, v_cache, meta, _ = build_case(seqs, num_heads, num_kv_heads, head_dim,
                                                    pad_tokens=pad_tokens, dtype=dtype)
    if not use_cpu_lists:
        meta.query_start_loc_cpu = meta.seq_lens_cpu = None
    scale = head_dim ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, ref_k, ref_v, meta.slot_mapping)
    expected = reference.paged_attention(q, ref_k, ref_v, meta, scale)
    cpu_paged.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    out = cpu_paged.paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    return out, expected


@pytest.mark.parametrize("group", [1, 3])
def test_mixed_prefill_chunks_and_decodes_match_reference(group):
    out, expected = run_both(MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_decode_batch_of_unequal_lengths_matches_reference(group):
    # (0, 1): a sequence whose only key is its new token; 47: its last block partly filled
    out, expected = run_both([(15, 1), (16, 1), (47, 1), (0, 1)], num_heads=3 * group, num_kv_heads=3, head_dim=64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_of_equal_lengths_needs_no_mask():
    q, k, v, k_cache, v_cache, meta, _ = build_case([(20, 1), (20, 1)], 4, 2, 16)
    assert cpu_paged.build_plan(meta, k_cache.shape[1]).decode.mask is None
    out, expected = run_both([(20, 1), (20, 1)], num_heads=4, num_kv_heads=2, head_dim=16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [MIXED, [(20, 1), (3, 1)]], ids=["mixed", "decode"])
def test_padding_rows_are_not_stored_and_are_zeroed(seqs):
    out, expected = run_both(seqs, num_heads=4, num_kv_heads=2, head_dim=16, pad_tokens=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[-3:] == 0)


def test_without_cpu_lists_and_in_bf16():
    out, expected = run_both(MIXED, num_heads=4, num_kv_heads=2, head_dim=16, use_cpu_lists=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out, expected = run_both(MIXED, num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_the_plan_is_built_once_per_forward():
    q, k, v, k_cache, v_cache, meta, _ = build_case(MIXED, 4, 2, 16)
    first = cpu_paged.plan_for(meta, k_cache.shape[1])
    assert cpu_paged.plan_for(meta, k_cache.shape[1]) is first
    _, _, _, _, _, other_meta, _ = build_case(MIXED, 4, 2, 16)
    assert cpu_paged.plan_for(other_meta, k_cache.shape[1]) is not first


def test_fp8_cache_is_read_as_the_reference_reads_it():
    q, k, v, k_cache, v_cache, meta, _ = build_case(MIXED, 4, 2, 16)
    fp8 = torch.float8_e4m3fn
    k_cache, v_cache = k_cache.clamp(-400, 400).to(fp8), v_cache.clamp(-400, 400).to(fp8)
    expected = reference.paged_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(cpu_paged.paged_attention(q, k_cache, v_cache, meta, 0.25), expected, atol=1e-5, rtol=1e-5)


def test_a_padding_sequence_with_no_blocks_reads_slot_zero():
    q, k, v, k_cache, v_cache, meta, _ = build_case([(20, 1), (3, 1)], 4, 2, 16)
    meta.seq_lens[1] = 0
    meta.seq_lens_cpu[1] = 0
    meta.max_seq_len = 21
    meta.block_tables[1] = -1
    group = cpu_paged.build_plan(meta, k_cache.shape[1]).decode
    assert group.context_slots.view(2, -1)[1].eq(0).all()
    out = cpu_paged.paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert torch.isfinite(out).all()
