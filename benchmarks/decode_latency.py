"""Decode latency per step at fixed batch sizes, in-process, at any tensor-parallel size.

    python benchmarks/decode_latency.py                              # TP=1, batches 1 and 64
    python benchmarks/decode_latency.py --tensor-parallel-size 2     # the same on two GPUs

Each batch size gets its own run: B sequences of --context random prompt tokens are
prefilled, then --steps decode steps are timed one by one (greedy, ignore_eos). A step is
the control plane's schedule + the data plane's execute (which returns the sampled ids on
the host) + postprocess; `execute` alone is reported too. `overlapped` is the engine's own
loop (the control plane plans and launches step N+1 while step N runs, benchmarks/throughput.py's
overlapped_step): the interval between consecutive steps' results, i.e. the time per output token
of each sequence. Model: Qwen3-0.6B architecture,
random bf16 weights, unless --model is given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import QWEN3_0_6B, LocalDataPlane, overlapped_step  # noqa: E402
from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions, Sequence  # noqa: E402


def prefilled_scheduler(dataplane: LocalDataPlane, batch_size: int, context: int, max_tokens: int,
                        vocab_size: int, step) -> Scheduler:
    """A Scheduler over batch_size greedy sequences of `context` random prompt tokens (seed 0), a fresh
    stream on the data plane, and `step(scheduler)` run until every prompt is prefilled."""
    facts = dataplane.runner.facts()
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=facts.num_kv_blocks, block_size=facts.block_size, max_num_seqs=facts.max_num_seqs,
        max_num_batched_tokens=facts.max_num_batched_tokens, max_model_len=facts.max_model_len))
    rng = np.random.default_rng(0)
    for i in range(batch_size):
        prompt = rng.integers(0, vocab_size, context).tolist()
        scheduler.add(Sequence(f"s{i}", prompt, SamplingOptions(max_tokens=max_tokens, temperature=0.0,
                                                                ignore_eos=True)))
    dataplane.open_stream()
    while scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        step(scheduler)
    return scheduler


def decode_step_times(dataplane: LocalDataPlane, batch_size: int, context: int, steps: int,
                      vocab_size: int, around_timed=contextlib.nullcontext) -> tuple[list[float], list[float]]:
    """around_timed: a context manager entered around the timed steps alone (a profiler)."""
    def one_step(scheduler: Scheduler) -> tuple[float, float]:
        start = time.perf_counter()
        plan = scheduler.schedule()
        before_execute = time.perf_counter()
        result = dataplane.step(plan)
        executed = time.perf_counter()
        scheduler.postprocess(plan, result)
        return time.perf_counter() - start, executed - before_execute

    scheduler = prefilled_scheduler(dataplane, batch_size, context, steps + 20, vocab_size, one_step)
    for _ in range(5):
        one_step(scheduler)
    with around_timed():
        timings = [one_step(scheduler) for _ in range(steps)]
    return [t for t, _ in timings], [e for _, e in timings]


def overlapped_step_times(dataplane: LocalDataPlane, batch_size: int, context: int, steps: int,
                          vocab_size: int) -> list[float]:
    """Seconds between consecutive results of the engine's overlapped loop (one step in flight)."""
    scheduler = prefilled_scheduler(dataplane, batch_size, context, steps + 40, vocab_size,
                                    lambda scheduler: overlapped_step(scheduler, dataplane))
    for _ in range(10):
        overlapped_step(scheduler, dataplane)
    stamps = []
    for _ in range(steps + 1):
        overlapped_step(scheduler, dataplane)
        stamps.append(time.perf_counter())
    while scheduler.in_flight:  # the last result, so the next run starts from an idle data plane
        scheduler.postprocess(scheduler.in_flight[0].plan, dataplane.receive())
    return list(np.diff(stamps))


def local_dataplane(model: str | None, max_model_len: int, enforce_eager: bool,
                    extra_flags: list[str] = ()) -> LocalDataPlane:
    """The data plane in this process on `model`, or on Qwen3-0.6B's architecture with random weights."""
    from dataplane.config import DataPlaneConfig
    from dataplane.main import build_parser
    from proto.options import config_from_args

    model_dir = model or tempfile.mkdtemp(prefix="nanoplane-latency-")
    flags = ["--model", model_dir, "--max-model-len", str(max_model_len), *extra_flags]
    if model is None:
        Path(model_dir, "config.json").write_text(json.dumps(QWEN3_0_6B))
        flags += ["--load-format", "dummy"]
    if enforce_eager:
        flags.append("--enforce-eager")
    return LocalDataPlane(config_from_args(DataPlaneConfig, build_parser().parse_args(flags)))


def summary(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder; default: Qwen3-0.6B architecture, random weights")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens of each sequence")
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per batch size")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    dataplane = local_dataplane(args.model, args.context + args.steps + 64, args.enforce_eager,
                                ["--tensor-parallel-size", str(args.tensor_parallel_size)])
    facts = dataplane.runner.facts()
    rows = []
    try:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            step_s, execute_s = decode_step_times(dataplane, batch_size, args.context, args.steps, facts.vocab_size)
            rows.append({"tensor_parallel_size": args.tensor_parallel_size, "batch_size": batch_size,
                         "context": args.context, "device": facts.device, "cuda_graphs": facts.device.startswith("cuda") and not args.enforce_eager,
                         "step": summary(step_s), "execute": summary(execute_s),
                         "overlapped": summary(overlapped_step_times(dataplane, batch_size, args.context, args.steps,
                                                                     facts.vocab_size))})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        dataplane.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
