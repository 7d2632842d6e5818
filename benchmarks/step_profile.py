"""Where a decode step's time goes, by kind of kernel: counts and GPU time per step, and the step's wall time.

    python benchmarks/step_profile.py                                  # batches 1, 64, 256 and the tail
    python benchmarks/step_profile.py --cases 1x512,8x2048 --steps 50  # batch x context

Each case is B sequences of `context` random prompt tokens, prefilled, then --steps decode steps (greedy,
ignore_eos) run as decode_latency.py runs them (schedule + execute + postprocess, one at a time) under
torch.profiler. The device's kernels (CUDA graph replays included) are grouped by kind from their names;
"tail" is the throughput workload's end: few sequences with long contexts. Model: Qwen3-0.6B architecture,
random bf16 weights, unless --model is given. Prints one JSON line per case.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_latency import decode_step_times, local_dataplane  # noqa: E402
from benchmarks.throughput import LocalDataPlane  # noqa: E402

# first match wins; names of Triton kernels (ours), cuBLAS/CUTLASS GEMMs, torch's elementwise kernels
KINDS = [
    ("attention", r"paged_decode|decode_reduce|prefill_kernel|flash|fmha|attention"),
    ("qk_norm_rope_kv", r"qk_norm|rope_store|norm_rope"),
    ("gemm", r"gemm|gemv|sm90_|sm80_|cutlass|cublas|nvjet|xmma|Kernel2|splitK"),
    ("norm", r"rms_norm"),
    ("rotary", r"rotary"),
    ("kv_store", r"store_kv"),
    ("activation", r"silu"),
    ("sampling", r"gumbel|argmax|sample|softmax|topk|sort|philox|bisect|threshold|radix|penalt"),
    ("copy", r"[Mm]emcpy|[Mm]emset|copy_|CatArray|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce_kernel|fill"),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def profile_case(dataplane: LocalDataPlane, batch_size: int, context: int, steps: int, vocab_size: int) -> dict:
    import numpy as np
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    step_s, execute_s = decode_step_times(dataplane, batch_size, context, steps, vocab_size, around_timed=lambda: prof)
    timed = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    count: dict[str, int] = defaultdict(int)
    busy: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for e in timed:
        kind = kind_of(e.name)
        count[kind] += 1
        busy[kind] += e.time_range.elapsed_us()
        names[e.name[:80]] += e.time_range.elapsed_us()
    per_step = lambda d: {k: round(v / steps, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {
        "batch_size": batch_size, "context": context, "steps": steps,
        "step_wall_median_ms": round(float(np.median(step_s)) * 1e3, 3),
        "execute_median_ms": round(float(np.median(execute_s)) * 1e3, 3),
        "kernels_per_step": round(len(timed) / steps, 1),
        "gpu_busy_us_per_step": round(sum(busy.values()) / steps, 1),
        "kernels_by_kind_per_step": per_step(count),
        "gpu_us_by_kind_per_step": per_step(busy),
        "top_kernels_us_per_step": dict(list(per_step(names).items())[:12]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder; default: Qwen3-0.6B architecture, random weights")
    parser.add_argument("--cases", default="1x512,64x512,256x512,4x2048",
                        help="comma-separated batch x context; the last default is the workload's tail")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    dataplane = local_dataplane(args.model, max(c for _, c in cases) + args.steps + 64, args.enforce_eager)
    vocab_size = dataplane.runner.facts().vocab_size
    rows = []
    try:
        for batch_size, context in cases:
            decode_step_times(dataplane, batch_size, context, 5, vocab_size)  # compiles this shape's kernels
            started = time.perf_counter()
            rows.append(profile_case(dataplane, batch_size, context, args.steps, vocab_size))
            rows[-1]["profiled_s"] = round(time.perf_counter() - started, 1)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        dataplane.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
