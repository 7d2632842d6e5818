"""Times decode-sized GEMMs: F.linear (cuBLAS) against the Triton skinny GEMM (layers/skinny_gemm.py).

Shapes: Qwen3-0.6B's four per-layer matmuls, Llama-3-8B's four and Qwen3-0.6B's tied LM head, at
M in {1, 8, 32, 64, 128, 256}, bf16. Each case is captured in a CUDA graph as back-to-back calls,
as the model replays them, each call on its own copy of W (enough copies to overflow L2, so every
call reads W from device memory), and timed with triton.testing.do_bench (median). Achieved GB/s =
(W + x + y bytes) / time, against the device-to-device copy bandwidth measured in the same run
(read + write). One JSON line per case, then one per shape with the largest M up to which the
skinny GEMM wins at every M measured (`recommended_max_m`), then the smallest of those over all
shapes: the value for skinny_gemm.MAX_M. `--sweep` also times a short list of configs per case
and prints the fastest, to adjust skinny_gemm.pick_config.

    PYTHONPATH=. python3 benchmarks/gemm_shapes.py [--sweep] [--m 1 8 32]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from benchmarks.attention_kernels import L2_FLUSH_BYTES, copy_bandwidth, graph_ms
from dataplane.layers.skinny_gemm import GemmConfig, pick_config, skinny_linear

SHAPES = {  # name -> (N, K) of y = x @ W^T with W [N, K]
    "qwen3-0.6b.qkv": (4096, 1024), "qwen3-0.6b.o": (1024, 2048),
    "qwen3-0.6b.gate_up": (6144, 1024), "qwen3-0.6b.down": (1024, 3072),
    "llama3-8b.qkv": (6144, 4096), "llama3-8b.o": (4096, 4096),
    "llama3-8b.gate_up": (28672, 4096), "llama3-8b.down": (4096, 14336),
    "qwen3-0.6b.lm_head": (151936, 1024),
}
BATCHES = [1, 8, 32, 64, 128, 256]
MIN_CALLS = 20


def graph_us(step, calls: int) -> float:
    """Median time per call of `step` (which makes `calls` GEMM calls), replayed from a CUDA graph."""
    return graph_ms(step, calls) * 1e3


class Case:
    """x [M, K] and enough copies of W [N, K] that the calls of one replay read W from device memory."""

    def __init__(self, m: int, n: int, k: int):
        self.m, self.n, self.k = m, n, k
        weight_bytes = n * k * 2
        self.copies = max(1, math.ceil(L2_FLUSH_BYTES / weight_bytes))
        self.weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                        for _ in range(self.copies)]
        self.x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        self.calls = max(MIN_CALLS, self.copies) if weight_bytes < L2_FLUSH_BYTES else 4
        self.bytes = weight_bytes + 2 * m * (k + n)

    def time_us(self, matmul) -> float:
        def step():
            for i in range(self.calls):
                matmul(self.x, self.weights[i % self.copies])
        return graph_us(step, self.calls)


def candidate_configs(m: int):
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    for block_n, block_k, split_k in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8)):
        yield GemmConfig(block_m, block_n, block_k, split_k)


def sweep(case: Case) -> tuple[float, GemmConfig]:
    """The fastest candidate config for one case (those that do not fit in shared memory skipped)."""
    timed = []
    for config in candidate_configs(case.m):
        try:
            timed.append((case.time_us(lambda x, w, c=config: skinny_linear(x, w, config=c)), config))
        except OutOfResources:
            continue
    return min(timed, key=lambda t: t[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time candidate configs per case")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bps = copy_bandwidth()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(json.dumps({"device": torch.cuda.get_device_name(), "num_sms": num_sms, "copy_gbps": round(copy_bps / 1e9)}))
    max_m = {}
    for name in args.shapes:
        n, k = SHAPES[name]
        wins_up_to = 0
        for m in sorted(args.m):
            case = Case(m, n, k)
            cublas_us = case.time_us(F.linear)
            skinny_us = case.time_us(skinny_linear)
            row = {"shape": name, "m": m, "n": n, "k": k, "config": str(pick_config(m, n, k, num_sms)),
                   "cublas_us": round(cublas_us, 2), "skinny_us": round(skinny_us, 2),
                   "cublas_gbps": round(case.bytes / cublas_us / 1e3), "skinny_gbps": round(case.bytes / skinny_us / 1e3),
                   "cublas_of_copy": round(case.bytes / cublas_us / 1e3 / (copy_bps / 1e9), 3),
                   "skinny_of_copy": round(case.bytes / skinny_us / 1e3 / (copy_bps / 1e9), 3),
                   "speedup": round(cublas_us / skinny_us, 3)}
            if args.sweep:
                best_us, best = sweep(case)
                row.update(best_config=str(best), best_us=round(best_us, 2),
                           best_of_copy=round(case.bytes / best_us / 1e3 / (copy_bps / 1e9), 3))
            print(json.dumps(row), flush=True)
            if skinny_us < cublas_us and wins_up_to == m_prev(args.m, m):
                wins_up_to = m
            del case
        max_m[name] = wins_up_to
        print(json.dumps({"shape": name, "recommended_max_m": wins_up_to}), flush=True)
    print(json.dumps({"recommended_max_m": min(max_m.values()), "per_shape": max_m}))


def m_prev(ms: list[int], m: int) -> int:
    """The M measured just below m (0 for the smallest): the skinny GEMM must win at every M up to the threshold."""
    smaller = [v for v in ms if v < m]
    return max(smaller) if smaller else 0


if __name__ == "__main__":
    main()
