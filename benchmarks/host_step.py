"""Host time per steady decode step, by phase, with a tiny model so that the model's own time is small.

    python benchmarks/host_step.py                               # batch 1, 64, 256
    python benchmarks/host_step.py --compare /path/to/other/tree # both trees, alternately, in one run

A Scheduler and an in-process data plane (benchmarks/throughput.py's LocalDataPlane, CPU, a
one-layer Qwen3 of 64 hidden units) run greedy sequences of 100 prompt tokens; once every one
has prefilled, each decode step is timed by phase (median µs):
  schedule      Scheduler.schedule()
  apply         the data plane's BatchState.apply (check the plan, stage the step's inputs)
  launch_rest   the rest of ModelRunner.launch: the forward, the sampling tail, the download
  result        PendingStep.result()
  postprocess   Scheduler.postprocess()
On a shared machine compare trees with --compare (they alternate, round after round), never
numbers of separate runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHASES = ("schedule", "apply", "launch_rest", "result", "postprocess")


def measure(batch_size: int, num_steps: int) -> dict[str, float]:
    """Median µs per phase of num_steps decode steps at batch_size, in this process's tree."""
    from benchmarks.throughput import QWEN3_0_6B, LocalDataPlane
    from controlplane.core.scheduler import Scheduler, SchedulerConfig
    from controlplane.core.sequence import SamplingOptions, Sequence
    from dataplane.config import DataPlaneConfig
    from dataplane.main import build_parser
    from proto.options import config_from_args

    config = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, vocab_size=1000)
    model_dir = tempfile.mkdtemp()
    Path(model_dir, "config.json").write_text(json.dumps(config))
    args = build_parser().parse_args(["--model", model_dir, "--load-format", "dummy", "--max-model-len", "4096",
                                      "--num-threads", "1"])
    dataplane = LocalDataPlane(config_from_args(DataPlaneConfig, args))
    runner, facts = dataplane.runner, dataplane.runner.facts()
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=facts.num_kv_blocks, block_size=facts.block_size, max_num_seqs=facts.max_num_seqs,
        max_num_batched_tokens=facts.max_num_batched_tokens, max_model_len=facts.max_model_len))
    rng = np.random.default_rng(0)
    for i in range(batch_size):
        scheduler.add(Sequence(f"s{i}", rng.integers(0, 1000, 100).tolist(),
                               SamplingOptions(max_tokens=num_steps + 1000, temperature=0.0, ignore_eos=True)))
    dataplane.open_stream()
    while scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        plan = scheduler.schedule()
        scheduler.postprocess(plan, dataplane.step(plan))

    times = {phase: [] for phase in PHASES}
    apply, apply_s = runner.batch.apply, [0.0]

    def timed_apply(plan):
        start = time.perf_counter()
        inputs = apply(plan)
        apply_s[0] = time.perf_counter() - start
        return inputs

    runner.batch.apply = timed_apply
    for _ in range(num_steps):
        t0 = time.perf_counter()
        plan = scheduler.schedule()
        t1 = time.perf_counter()
        pending = runner.launch(plan)
        t2 = time.perf_counter()
        result = pending.result()
        t3 = time.perf_counter()
        scheduler.postprocess(plan, result)
        t4 = time.perf_counter()
        for phase, seconds in zip(PHASES, (t1 - t0, apply_s[0], t2 - t1 - apply_s[0], t3 - t2, t4 - t3)):
            times[phase].append(seconds)
    dataplane.close()
    return {phase: float(np.median(v)) * 1e6 for phase, v in times.items()}


def run_tree(tree: Path, batch_sizes: list[int], num_steps: int) -> dict[int, dict[str, float]]:
    """This script's measure() in a subprocess whose imports come from tree."""
    code = (f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(Path(__file__).parent)!r})\n"
            f"from host_step import measure\n"
            f"print(json.dumps({{b: measure(b, {num_steps}) for b in {batch_sizes!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True, text=True).stdout
    return {int(b): v for b, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--compare", type=Path, help="another source tree, measured alternately with this one")
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: rounds of both trees")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} | ({"other": args.compare.resolve()} if args.compare else {})
    rounds = args.rounds if args.compare else 1
    runs: dict[str, list] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            runs[name].append(run_tree(tree, args.batch_sizes, args.num_steps))
    for b in args.batch_sizes:
        for name in trees:
            row = {p: round(float(np.median([r[b][p] for r in runs[name]]))) for p in PHASES}
            print(f"batch {b:4d} {name:5s} " + "  ".join(f"{p} {v:6d}" for p, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
