"""Triton attention kernels against the torch reference (dataplane/attention/reference.py).

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set here before Triton is imported) on small shapes; on a GPU the `gpu` tests cover GQA
ratios 1-8, head_dim 64 and 128, block sizes 16/32/256, contexts of 1 to 8192 tokens,
chunked prefill, prefix-cache hits, mixed prefill+decode batches and padding slots. Every
batch poisons what the kernels must not read (cache slots past each sequence, spare blocks
behind unused block-table entries) and what they must write (outputs) with NaN. Each result
is compared with the reference (fp32, on the same cache) and with a naive dense attention
over the per-sequence K/V that never touches the cache.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, interpreter_numpy_compat, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run here")

from dataplane.attention import reference  # noqa: E402
from dataplane.context import AttentionMetadata  # noqa: E402


if not HAS_CUDA:
    interpreter_numpy_compat()


store_kv_mod = kernel_module("dataplane.attention.triton_store_kv")
decode_mod = kernel_module("dataplane.attention.triton_decode")
prefill_mod = kernel_module("dataplane.attention.triton_prefill")
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# Triton 3.6's interpreter multiplies bf16 tl.dot operands as raw bits: bf16 attention is checked on the GPU only
compiled_bf16 = pytest.mark.skipif(not HAS_CUDA, reason="the Triton interpreter computes tl.dot on bf16 wrongly")


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]: this step's keys, stored by the test
    v_new: torch.Tensor
    k_cache: torch.Tensor  # prefixes already stored; NaN where nothing may be read
    v_cache: torch.Tensor
    meta: AttentionMetadata
    keys: list[torch.Tensor]  # dense per-sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    scale: float


def make_batch(specs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, seed: int = 0, pad_tokens: int = 0) -> Batch:
    """specs: (q_len, seq_len) per sequence; the first seq_len - q_len tokens are already in the cache."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    keys = [randn(seq_len, num_kv_heads, head_dim) for _, seq_len in specs]
    values = [randn(seq_len, num_kv_heads, head_dim) for _, seq_len in specs]
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in specs]
    num_spare = 3  # NaN blocks that unused block-table entries point at
    num_blocks = sum(blocks_per_seq) + num_spare
    order = torch.randperm(num_blocks, generator=gen)
    spare, order = order[:num_spare], order[num_spare:]
    width = max(blocks_per_seq) + 2
    block_tables = spare[torch.randint(0, num_spare, (len(specs), width), generator=gen)]
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots, q_rows = [], []
    used = 0
    for i, (q_len, seq_len) in enumerate(specs):
        block_tables[i, :blocks_per_seq[i]] = order[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        positions = torch.arange(seq_len)
        seq_slots = block_tables[i, positions // block_size] * block_size + positions % block_size
        cached = seq_len - q_len
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:cached]] = keys[i][:cached]
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:cached]] = values[i][:cached]
        slots.append(seq_slots[cached:])
        q_rows.append(q_len)
    slot_mapping = torch.cat(slots + [torch.full((pad_tokens,), -1, dtype=torch.long)])
    num_tokens = slot_mapping.shape[0]
    k_new = torch.cat([k[s - q:] for k, (q, s) in zip(keys, specs)] + [randn(pad_tokens, num_kv_heads, head_dim)])
    v_new = torch.cat([v[s - q:] for v, (q, s) in zip(values, specs)] + [randn(pad_tokens, num_kv_heads, head_dim)])
    query_start_loc = [0]
    for q_len in q_rows:
        query_start_loc.append(query_start_loc[-1] + q_len)
    seq_lens = [seq_len for _, seq_len in specs]
    dev = lambda t, dt=None: t.to(device=DEVICE, dtype=dt or t.dtype)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=dev(slot_mapping), query_start_loc=dev(torch.tensor(query_start_loc), torch.int32),
        seq_lens=dev(torch.tensor(seq_lens), torch.int32), block_tables=dev(block_tables, torch.int32),
        max_query_len=max(q_rows), max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens)
    return Batch(dev(randn(num_tokens, num_heads, head_dim)), dev(k_new), dev(v_new), dev(k_cache), dev(v_cache),
                 meta, [dev(k) for k in keys], [dev(v) for v in values], 1.0 / math.sqrt(head_dim))


def dense_attention(batch: Batch) -> torch.Tensor:
    """Naive causal attention over the dense per-sequence K/V, in fp64: no cache, no block table."""
    qsl = batch.meta.query_start_loc_cpu
    group = batch.q.shape[1] // batch.k_new.shape[1]
    out = torch.zeros(batch.q.shape, dtype=torch.float64, device=batch.q.device)
    for i, (keys, values) in enumerate(zip(batch.keys, batch.values)):
        q = batch.q[qsl[i]:qsl[i + 1]].double()
        k = keys.double().repeat_interleave(group, dim=1)
        v = values.double().repeat_interleave(group, dim=1)
        seq_len, q_len = k.shape[0], q.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * batch.scale
        visible = torch.arange(seq_len, device=q.device)[None, :] <= torch.arange(seq_len - q_len, seq_len,
                                                                                  device=q.device)[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[qsl[i]:qsl[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def reference_attention(batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    # fp32 reference on the same cache; the poison is zeroed because the reference may multiply it by 0
    return reference.paged_attention(batch.q.float(), k_cache.float().nan_to_num(), v_cache.float().nan_to_num(),
                                     batch.meta, batch.scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf: a row was left unwritten or read poisoned memory"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def store(batch: Batch, triton_store: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    fn = store_kv_mod.store_kvcache if triton_store else reference.store_kv
    fn(batch.k_new, batch.v_new, k_cache, v_cache, batch.meta.slot_mapping)
    return k_cache, v_cache


def check_store(batch: Batch):
    k_cache, v_cache = store(batch)
    k_ref, v_ref = store(batch, triton_store=False)
    assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))


def run_attention(batch: Batch, kind: str, **kwargs) -> torch.Tensor:
    k_cache, v_cache = store(batch)
    meta = batch.meta
    out = torch.full_like(batch.q, float("nan"))
    if kind == "decode":
        decode_mod.paged_decode(batch.q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len,
                                batch.scale, out=out, **kwargs)
    elif kind == "prefill":
        prefill_mod.paged_prefill(batch.q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                  meta.seq_lens, batch.scale, out=out, **kwargs)
    else:
        from dataplane.attention import get_attention_backend
        out = get_attention_backend("triton").forward(batch.q, k_cache, v_cache, meta, batch.scale)
    return out, k_cache, v_cache


def check_attention(batch: Batch, kind: str, **kwargs):
    out, k_cache, v_cache = run_attention(batch, kind, **kwargs)
    num_rows = batch.meta.query_start_loc_cpu[-1]
    tol = tolerance(batch.q.dtype)
    err_ref = rel_err(out[:num_rows], reference_attention(batch, k_cache, v_cache)[:num_rows])
    err_dense = rel_err(out[:num_rows], dense_attention(batch)[:num_rows])
    assert err_ref < tol and err_dense < tol, f"relative error {err_ref:.2e} vs reference, {err_dense:.2e} vs dense"


# ---------------------------------------------------------------- CPU: the interpreter, small shapes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_padding(dtype):
    batch = make_batch([(3, 5), (1, 17), (20, 20)], 4, 2, 16, 16, dtype, pad_tokens=4)
    check_store(batch)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 16), (4, 2, 32), (8, 2, 16)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_small(num_heads, num_kv_heads, head_dim, num_splits):
    specs = [(1, 1), (1, 16), (1, 17), (1, 50)]
    batch = make_batch(specs, num_heads, num_kv_heads, head_dim, 16, torch.float32, seed=num_heads + num_splits)
    check_attention(batch, "decode", num_splits=num_splits, block_n=16)


@compiled_bf16
def test_decode_bf16_small():
    batch = make_batch([(1, 7), (1, 33)], 4, 1, 16, 16, torch.bfloat16, seed=3)
    check_attention(batch, "decode", num_splits=2, block_n=16)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_small(num_heads, num_kv_heads, block_size):
    # a fresh prompt, a chunk after a cached prefix, a decode row, and a prompt crossing blocks
    specs = [(5, 5), (3, 20), (1, 9), (18, 18)]
    batch = make_batch(specs, num_heads, num_kv_heads, 16, block_size, torch.float32, seed=block_size + num_heads)
    check_attention(batch, "prefill")


@compiled_bf16
def test_prefill_bf16_head_dim_32():
    batch = make_batch([(9, 40), (6, 6)], 4, 2, 32, 16, torch.bfloat16, seed=5)
    check_attention(batch, "prefill")


def test_backend_dispatch_and_padding_rows():
    backend_mod = importlib.reload(importlib.import_module("dataplane.attention.triton_backend"))
    assert backend_mod.runnable_here()
    for specs, pad in (([(1, 3), (1, 20)], 2), ([(4, 4), (1, 20)], 3)):
        batch = make_batch(specs, 4, 2, 16, 16, torch.float32, seed=pad, pad_tokens=pad)
        out, k_cache, v_cache = run_attention(batch, "backend")
        ref = reference_attention(batch, k_cache, v_cache)
        assert rel_err(out, ref) < 1e-4
        assert (out[-pad:] == 0).all()


def test_decode_padding_sequence_is_finite():
    # a CUDA-graph batch pads with sequences of length 0: their rows must stay finite (zero here)
    batch = make_batch([(1, 10), (1, 1)], 4, 2, 16, 16, torch.float32)
    k_cache, v_cache = store(batch)
    seq_lens = batch.meta.seq_lens.clone()
    seq_lens[1] = 0
    for num_splits in (1, 2):
        out = decode_mod.paged_decode(batch.q, k_cache, v_cache, batch.meta.block_tables, seq_lens, 10, batch.scale,
                                      num_splits=num_splits, block_n=16)
        assert (out[1] == 0).all() and torch.isfinite(out).all()


def test_choose_num_splits():
    choose = decode_mod.choose_num_splits
    assert choose(256, 8, 8192, 132) == 1  # the batch fills the GPU
    assert choose(1, 8, 100, 132) == 1  # too short to split
    assert choose(1, 8, 8192, 132) == 32  # one long sequence: split as far as useful
    assert 1 < choose(16, 8, 4096, 132) <= 16


# ---------------------------------------------------------------- GPU: full shapes, bf16

GQA = [(8, 8), (16, 8), (16, 4), (32, 4)]  # group sizes 1, 2, 4, 8


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_store_kv(block_size):
    batch = make_batch([(7, 300), (1, 4096), (513, 513)], 16, 8, 128, block_size, torch.bfloat16, pad_tokens=9)
    check_store(batch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_gpu_decode(num_heads, num_kv_heads, head_dim, block_size):
    lens = [1, 15, 16, 17, 255, 256, 257, 1000, 4095, 8192]
    batch = make_batch([(1, n) for n in lens], num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16,
                       seed=num_heads * head_dim + block_size)
    for num_splits in (None, 1, 7):
        check_attention(batch, "decode", num_splits=num_splits)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch_size,context", [(1, 8192), (4, 3000), (64, 2048), (256, 512)])
def test_gpu_decode_auto_splits(batch_size, context):
    gen = torch.Generator().manual_seed(batch_size)
    lens = torch.randint(max(1, context // 2), context + 1, (batch_size,), generator=gen).tolist()
    batch = make_batch([(1, n) for n in lens], 16, 8, 128, 16, torch.bfloat16, seed=context)
    check_attention(batch, "decode")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_prefill(num_heads, num_kv_heads, head_dim, block_size):
    specs = [
        (1, 1), (17, 17), (256, 256), (1000, 1000),  # fresh prompts
        (64, 320), (255, 2049),  # chunks after cached prefixes (chunked prefill, prefix-cache hits)
        (1, 77), (1, 4096),  # decodes in the same batch
        (512, 8192),  # the last chunk of a long prompt
    ]
    batch = make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16,
                       seed=num_heads * head_dim + block_size)
    check_attention(batch, "prefill")


@gpu
@pytest.mark.gpu
def test_gpu_prefill_long_and_fp32():
    check_attention(make_batch([(4096, 4096)], 16, 8, 128, 16, torch.bfloat16, seed=1), "prefill")
    check_attention(make_batch([(100, 700), (1, 50), (33, 33)], 16, 4, 64, 32, torch.float32, seed=2), "prefill")
    check_attention(make_batch([(1, 700), (1, 5000)], 16, 4, 64, 32, torch.float32, seed=3), "decode")


@gpu
@pytest.mark.gpu
def test_gpu_prefill_odd_head_dims():
    for head_dim in (16, 80, 96, 256):
        check_attention(make_batch([(40, 300), (1, 64), (70, 70)], 8, 2, head_dim, 16, torch.bfloat16), "prefill")
        check_attention(make_batch([(1, 300), (1, 64)], 8, 2, head_dim, 16, torch.bfloat16), "decode")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("specs", [[(1, 9), (1, 3000)], [(200, 900), (1, 3000), (1, 17)]], ids=["decode", "mixed"])
def test_gpu_backend(specs):
    batch = make_batch(specs, 16, 8, 128, 16, torch.bfloat16, pad_tokens=5)
    out, k_cache, v_cache = run_attention(batch, "backend")
    rows = batch.meta.query_start_loc_cpu[-1]
    assert rel_err(out[:rows], reference_attention(batch, k_cache, v_cache)[:rows]) < 1e-2
    assert (out[rows:] == 0).all()
