"""Decode tok/s of the data plane on the CPU, in-process, per weight format and attention backend.

    python benchmarks/cpu_decode.py                                   # the embedded SmolLM2-135M GGUF
    python benchmarks/cpu_decode.py --cpu-weights fp32,int4 --batch-sizes 1,16 --num-threads 1

For each (--cpu-weights, --attention-backend) pair a ModelRunner is built (no process boundary, no
control-plane transport: benchmarks/cpu_vs_transformers.py measures end to end) and, per batch size,
B sequences of --context random prompt tokens are prefilled, then --steps greedy decode steps are timed
(schedule + execute + postprocess, as benchmarks/decode_latency.py). The figure is B * steps / seconds.
The greedy tokens of every configuration are compared with those of the first one (put fp32 + torch,
the oracle, first): `agreement` is the fraction of sequences whose whole generated text is identical and
`token_agreement` the fraction of positions equal up to each sequence's first difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import LocalDataPlane  # noqa: E402
from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions, Sequence  # noqa: E402


def greedy_decode(dataplane: LocalDataPlane, batch_size: int, context: int, steps: int, vocab_size: int,
                  seed: int) -> tuple[float, list[list[int]]]:
    """-> (seconds of the timed decode steps, each sequence's generated ids)."""
    facts = dataplane.runner.facts()
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=facts.num_kv_blocks, block_size=facts.block_size, max_num_seqs=facts.max_num_seqs,
        max_num_batched_tokens=facts.max_num_batched_tokens, max_model_len=facts.max_model_len))
    rng = np.random.default_rng(seed)
    seqs = [Sequence(f"s{i}", rng.integers(0, vocab_size, context).tolist(),
                     SamplingOptions(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
            for i in range(batch_size)]
    for seq in seqs:
        scheduler.add(seq)
    dataplane.open_stream()

    def one_step() -> None:
        plan = scheduler.schedule()
        scheduler.postprocess(plan, dataplane.step(plan))

    while scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        one_step()
    start = time.perf_counter()
    while scheduler.running:
        one_step()
    seconds = time.perf_counter() - start
    return seconds, [list(s.token_ids[s.num_prompt_tokens:]) for s in seqs]


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> tuple[float, float]:
    same_seqs = sum(a == b for a, b in zip(reference, tokens)) / len(reference)
    equal = total = 0
    for a, b in zip(reference, tokens):
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        equal += first_diff
        total += len(a)
    return same_seqs, equal / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=".gguf or HF folder; default: the embedded SmolLM2-135M")
    parser.add_argument("--cpu-weights", default="fp32,bf16,int4", help="comma-separated --cpu-weights values")
    parser.add_argument("--attention-backends", default="torch,cpu", help="comma-separated --attention-backend values")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    parser.add_argument("--context", type=int, default=32, help="prompt tokens of each sequence")
    parser.add_argument("--steps", type=int, default=128, help="decode steps (tokens per sequence) timed")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from dataplane.config import DataPlaneConfig
    from dataplane.main import build_parser
    from nanoplane.default_model import default_model_path
    from proto.options import config_from_args

    model = args.model or default_model_path()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows, reference = [], {}
    for weights in args.cpu_weights.split(","):
        for backend in args.attention_backends.split(","):
            flags = ["--model", model, "--device", "cpu", "--cpu-weights", weights, "--attention-backend", backend,
                     "--max-model-len", str(args.context + args.steps + 64), "--num-threads", str(args.num_threads),
                     "--max-num-seqs", str(max(batch_sizes))]
            dataplane = LocalDataPlane(config_from_args(DataPlaneConfig, build_parser().parse_args(flags)))
            facts = dataplane.runner.facts()
            try:
                for batch_size in batch_sizes:
                    greedy_decode(dataplane, batch_size, args.context, 8, facts.vocab_size, args.seed + 1)  # warm
                    seconds, tokens = greedy_decode(dataplane, batch_size, args.context, args.steps,
                                                    facts.vocab_size, args.seed)
                    row = {"cpu_weights": weights, "attention_backend": backend, "batch_size": batch_size,
                           "context": args.context, "steps": args.steps,
                           "tok_per_s": round(batch_size * args.steps / seconds, 1)}
                    if batch_size in reference:
                        row["agreement"], row["token_agreement"] = (round(x, 4) for x in
                                                                    agreement(reference[batch_size], tokens))
                    else:
                        reference[batch_size] = tokens
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                dataplane.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
