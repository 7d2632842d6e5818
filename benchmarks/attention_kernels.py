"""Times the Triton attention kernels against the torch reference on one GPU.

Decode: batch 1/16/64/256 x context 512..8192, Qwen3-0.6B's attention shape by default
(16 query heads, 8 KV heads, head_dim 128, bf16, block_size 16). Each case is captured in
a CUDA graph, as the runner replays decode steps, and timed with triton.testing.do_bench
(median); when the KV cache of one case would fit in L2, the graph cycles through several
copies so that every replay reads from device memory. Achieved bandwidth = bytes of K/V
read / time, next to the device-to-device copy bandwidth measured the same way (bytes
read + written). Prefill: fresh prompts and a chunk after a long cached prefix, in
TFLOP/s (causal FLOPs only), against the reference and against torch SDPA on dense,
unpaged K/V (a ceiling the paged kernel should approach). `--sweep` also times kernel
configurations and split counts, to choose the defaults in triton_decode.py/triton_prefill.py.

    PYTHONPATH=. python3 benchmarks/attention_kernels.py [--sweep] [--block-size 16] [--head-dim 128]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from dataplane.attention import reference
from dataplane.attention.triton_decode import choose_num_splits, paged_decode
from dataplane.attention.triton_prefill import paged_prefill
from dataplane.context import AttentionMetadata

L2_FLUSH_BYTES = 256 << 20  # a case smaller than this is replicated so replays miss in L2


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def graph_ms(step, repeats: int) -> float:
    """Median time of one `step` (which runs `repeats` kernel calls), captured in a CUDA graph, per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return bench_ms(graph.replay) / repeats


class DecodeCase:
    """`copies` independent caches and block tables of `batch` sequences of `context` tokens each."""

    def __init__(self, batch, context, heads, kv_heads, head_dim, block_size, dtype=torch.bfloat16):
        self.batch, self.context, self.heads, self.kv_heads, self.head_dim = batch, context, heads, kv_heads, head_dim
        self.kv_bytes = 2 * batch * context * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.copies = max(1, math.ceil(L2_FLUSH_BYTES / self.kv_bytes))
        blocks_per_seq = triton.cdiv(context, block_size)
        num_blocks = self.copies * batch * blocks_per_seq
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, dtype=dtype, device="cuda")
        self.v_cache = torch.randn(shape, dtype=dtype, device="cuda")
        tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(self.copies, batch, blocks_per_seq)
        self.block_tables = list(tables)
        self.q = torch.randn(batch, heads, head_dim, dtype=dtype, device="cuda")
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.out = torch.empty_like(self.q)
        self.scale = 1 / math.sqrt(head_dim)

    def triton_ms(self, **kwargs) -> float:
        def step():
            for table in self.block_tables:
                paged_decode(self.q, self.k_cache, self.v_cache, table, self.seq_lens, self.context, self.scale,
                             out=self.out, **kwargs)
        return graph_ms(step, self.copies)

    def reference_ms(self) -> float:
        qsl = list(range(self.batch + 1))
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(self.batch, dtype=torch.long, device="cuda"),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"), seq_lens=self.seq_lens,
            block_tables=self.block_tables[0], max_query_len=1, max_seq_len=self.context,
            query_start_loc_cpu=qsl, seq_lens_cpu=[self.context] * self.batch)
        return bench_ms(lambda: reference.paged_attention(self.q, self.k_cache, self.v_cache, meta, self.scale))


def decode_table(args, copy_bw: float):
    print(f"\n## Decode: {args.heads} q heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, bf16, "
          f"block_size {args.block_size}; copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print("| batch | context | splits | KV MB | triton us | TB/s | % copy BW | reference us | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in (1, 16, 64, 256):
        for context in (512, 1024, 2048, 4096, 8192):
            case = DecodeCase(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
            ms = case.triton_ms()
            bw = case.kv_bytes / (ms * 1e-3)
            ref = case.reference_ms() if case.kv_bytes * 2 <= 2 << 30 else float("nan")  # fp32 gathers: mind memory
            splits = choose_num_splits(batch, args.kv_heads, context, sms)
            ref_cells = f"{ref * 1e3:.0f} | {ref / ms:.0f}x" if ref == ref else "- (too large) | -"
            print(f"| {batch} | {context} | {splits} | {case.kv_bytes / 1e6:.1f} | {ms * 1e3:.1f} | {bw / 1e12:.2f} | "
                  f"{100 * bw / copy_bw:.0f}% | {ref_cells} |")
            del case
            torch.cuda.empty_cache()


def prefill_case(specs, heads, kv_heads, head_dim, block_size, dtype=torch.bfloat16):
    """specs: (q_len, seq_len) per sequence. Returns q, caches, meta, causal FLOPs."""
    blocks = [triton.cdiv(s, block_size) for _, s in specs]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    qsl = [0]
    for q_len, _ in specs:
        qsl.append(qsl[-1] + q_len)
    q = torch.randn(qsl[-1], heads, head_dim, dtype=dtype, device="cuda")
    seq_lens = [s for _, s in specs]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.long, device="cuda"),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), block_tables=tables,
        max_query_len=max(q for q, _ in specs), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens)
    # query j of a sequence sees seq_len - q_len + j + 1 keys; QK^T and PV cost 2 * head_dim FLOPs per key each
    flops = sum(4 * heads * head_dim * (q * (s - q) + q * (q + 1) / 2) for q, s in specs)
    return q, k_cache, v_cache, meta, flops


def run_prefill(q, k_cache, v_cache, meta, **kwargs):
    return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                         1 / math.sqrt(q.shape[-1]), **kwargs)


PREFILL_CASES = {
    "1 x 512 prompt": [(512, 512)],
    "1 x 4096 prompt": [(4096, 4096)],
    "8 x 1024 prompts": [(1024, 1024)] * 8,
    "chunk 512 after 7680 cached": [(512, 8192)],
    "mixed: 2048 chunk + 255 decodes at 1024": [(2048, 2048)] + [(1, 1024)] * 255,
}


def prefill_table(args, copy_bw: float):
    print(f"\n## Prefill: {args.heads} q heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, bf16, "
          f"block_size {args.block_size}")
    print("| case | tokens | triton ms | TFLOP/s | KV-read floor ms | reference ms | dense SDPA ms (no paging) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, specs in PREFILL_CASES.items():
        q, k_cache, v_cache, meta, flops = prefill_case(specs, args.heads, args.kv_heads, args.head_dim,
                                                        args.block_size)
        ms = bench_ms(lambda: run_prefill(q, k_cache, v_cache, meta))
        ref = bench_ms(lambda: reference.paged_attention(q, k_cache, v_cache, meta, 1 / math.sqrt(args.head_dim)))
        sdpa = float("nan")
        if all(ql == sl == specs[0][0] for ql, sl in specs):  # equal fresh prompts: one batched dense call
            b, n = len(specs), specs[0][0]
            qd = q.view(b, n, args.heads, args.head_dim).transpose(1, 2)
            kd = torch.randn(b, args.kv_heads, n, args.head_dim, dtype=q.dtype, device="cuda")
            sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True))
        floor_ms = k_cache.numel() * k_cache.element_size() * 2 / copy_bw * 1e3  # every cached K/V read once
        sdpa_cell = f"{sdpa:.3f}" if sdpa == sdpa else "-"
        print(f"| {name} | {q.shape[0]} | {ms:.3f} | {flops / (ms * 1e-3) / 1e12:.0f} | {floor_ms:.3f} | {ref:.2f} "
              f"| {sdpa_cell} |")


def sweep(args, copy_bw: float):
    print("\n## Sweep: decode configurations (us per call; TB/s)")
    configs = [dict(block_n=bn, num_warps=w, num_stages=s)
               for bn, w, s in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2))]
    for batch, context in ((1, 8192), (16, 4096), (64, 2048), (256, 4096)):
        case = DecodeCase(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
        cells = []
        for c in configs:
            ms = case.triton_ms(**c)
            cells.append(f"bn{c['block_n']}/w{c['num_warps']}/s{c['num_stages']}: {ms * 1e3:.1f} "
                         f"({case.kv_bytes / (ms * 1e-3) / 1e12:.2f})")
        print(f"- batch {batch} ctx {context}: " + "; ".join(cells))
        splits = [1, 2, 3, 4, 8, 16, 32, 64]
        cells = [f"{s}: {case.triton_ms(num_splits=s) * 1e3:.1f}" for s in splits]
        print("  splits: " + "; ".join(cells))
        del case
        torch.cuda.empty_cache()
    pconfigs = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 128, 4, 3),
                                     (64, 64, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3))]
    for head_dim in dict.fromkeys((args.head_dim, 64)):
        print(f"\n## Sweep: prefill configurations, head_dim {head_dim} (ms)")
        for name in ("1 x 4096 prompt", "chunk 512 after 7680 cached", "mixed: 2048 chunk + 255 decodes at 1024"):
            prefill_sweep_row(name, pconfigs, args.heads, args.kv_heads, head_dim, args.block_size)


def prefill_sweep_row(name, pconfigs, heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, meta, flops = prefill_case(PREFILL_CASES[name], heads, kv_heads, head_dim, block_size)
    cells = []
    for c in pconfigs:
        try:
            ms = bench_ms(lambda: run_prefill(q, k_cache, v_cache, meta, **c))
            cells.append(f"m{c['block_m']}/n{c['block_n']}/w{c['num_warps']}/s{c['num_stages']}: {ms:.3f}")
        except Exception as e:  # a config may not fit in shared memory
            cells.append(f"{c}: {type(e).__name__}")
    print(f"- {name}: " + "; ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="also time kernel configurations and split counts")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the attention benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    if args.sweep:
        sweep(args, copy_bw)
    decode_table(args, copy_bw)
    prefill_table(args, copy_bw)


if __name__ == "__main__":
    main()
