"""Speculative decoding (n-gram prompt lookup) on a copy-heavy workload: acceptance and tokens/s, with and without.

    python benchmarks/speculative.py                       # the default model, batch 1 and 16, k = 4
    python benchmarks/speculative.py --throughput          # also the plain throughput workload at batch 256

Model: the embedded default (SmolLM2-135M-Instruct) unless --model. Workload: each request asks the model to
rewrite a piece of this repository's own Python source (a few hundred tokens) with one function renamed
(REWRITE_TASK); the answer copies most of the prompt, which is what prompt lookup exploits. Greedy by default
(--temperature), ignore_eos off, --max-tokens each. Batch 1 runs --num-requests-b1 requests one after
another; batch 16 runs 16 at once. Each is run without speculation and with it (--num-speculative-tokens k),
on the same warm engine, and printed side by side: output tokens, seconds, tokens/s, speed-up, acceptance
rate (accepted / proposed draft tokens) and mean acceptance length (tokens per speculative step of a
sequence: 1 + accepted / drafts), and whether the greedy outputs are the same tokens.

--throughput adds benchmarks/throughput.py's workload (256 random-token prompts, temperature 0.6) at batch
256 with speculation off and on: with --speculative-disable-batch-size (default 32) it backs off, so the
figure shows what having it on costs there (nothing is proposed while the batch is large).

The engine runs in this process (benchmarks/throughput.py's LocalDataPlane and overlapped step: one plan in
flight, as the Engine does); speculating sequences wait for their token in flight (docs/speculative.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import LocalDataPlane, overlapped_step, workload  # noqa: E402
from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions, Sequence  # noqa: E402
from controlplane.core.speculative import SpeculativeConfig, Speculator  # noqa: E402

REWRITE_TASK = ("Rewrite the following Python code, renaming the function `{old}` to `{new}` everywhere. "
                "Change nothing else. Answer with the code only.\n\n```python\n{code}\n```")
SOURCES = ("controlplane/core/block_manager.py", "controlplane/core/plan_builder.py", "controlplane/core/sequence.py",
           "controlplane/serving/detokenizer.py", "dataplane/sampling/sampler.py", "proto/step.py")


def code_snippets(num: int, max_lines: int) -> list[tuple[str, str]]:
    """(code, a function name defined in it): consecutive pieces of the sources that define a function."""
    snippets = []
    for source in SOURCES:
        lines = (ROOT / source).read_text().splitlines()
        for start in range(0, len(lines), max_lines):
            piece = lines[start:start + max_lines]
            names = [ln.split("def ", 1)[1].split("(", 1)[0] for ln in piece if ln.lstrip().startswith("def ")]
            if names:
                snippets.append(("\n".join(piece), names[0]))
    if len(snippets) < num:
        sys.exit(f"only {len(snippets)} snippets in {SOURCES}; ask for fewer")
    return snippets[:num]


def rewrite_prompts(tokenizer, num: int, max_lines: int) -> list[list[int]]:
    prompts = []
    for code, name in code_snippets(num, max_lines):
        task = REWRITE_TASK.format(old=name, new=name + "_renamed", code=code)
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": task}]))
    return prompts


def run(dataplane, info: dict, prompts: list[list[int]], max_tokens: list[int], sampling: dict,
        spec: SpeculativeConfig | None, eos: tuple[int, ...]) -> dict:
    """Runs the prompts to completion at once; returns the figures and every output."""
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info["num_kv_blocks"], block_size=info["block_size"], max_num_seqs=info["max_num_seqs"],
        max_num_batched_tokens=info["max_num_batched_tokens"], max_model_len=info["max_model_len"],
        eos_token_ids=eos))
    if spec is not None:
        scheduler.speculator = Speculator(spec)
    seqs = [Sequence(f"s{i}", p, SamplingOptions(max_tokens=m, **sampling))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    for seq in seqs:
        scheduler.add(seq)
    dataplane.open_stream()
    start = time.perf_counter()
    while scheduler.has_unfinished() or scheduler.in_flight:
        overlapped_step(scheduler, dataplane)
    seconds = time.perf_counter() - start
    num_steps = scheduler.plan_builder.next_step_id  # plans sent (the data plane's forwards)
    c = scheduler.speculator.counters
    return {"outputs": [s.completion_token_ids for s in seqs], "seconds": seconds, "num_steps": num_steps,
            "tokens": sum(s.num_completion_tokens for s in seqs), "drafts": c.num_drafts,
            "draft_tokens": c.num_draft_tokens, "accepted": c.num_accepted_tokens}


def one_after_another(dataplane, info, prompts, max_tokens, sampling, spec, eos) -> dict:
    total = {"outputs": [], "seconds": 0.0, "num_steps": 0, "tokens": 0, "drafts": 0, "draft_tokens": 0,
             "accepted": 0}
    for p, m in zip(prompts, max_tokens):
        r = run(dataplane, info, [p], [m], sampling, spec, eos)
        for key, value in r.items():
            total[key] += value
    return total


def row(label: str, plain: dict, spec: dict) -> dict:
    tps = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    figures = {
        "workload": label, "tokens_plain": plain["tokens"], "tokens_spec": spec["tokens"],
        "tok_per_s_plain": round(tps(plain), 1), "tok_per_s_spec": round(tps(spec), 1),
        "speedup": round(tps(spec) / tps(plain), 2),
        "steps_plain": plain["num_steps"], "steps_spec": spec["num_steps"],
        "acceptance_rate": round(spec["accepted"] / spec["draft_tokens"], 3) if spec["draft_tokens"] else None,
        "mean_acceptance_length": round(1 + spec["accepted"] / spec["drafts"], 2) if spec["drafts"] else None,
        "same_tokens": plain["outputs"] == spec["outputs"],
    }
    print(f"{label:<22} {figures['tok_per_s_plain']:>9} {figures['tok_per_s_spec']:>9} {figures['speedup']:>7}x "
          f"{str(figures['acceptance_rate']):>10} {str(figures['mean_acceptance_length']):>8} "
          f"{figures['steps_plain']:>7} {figures['steps_spec']:>7} {str(figures['same_tokens']):>6}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf; default: the embedded default model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=SpeculativeConfig.ngram_min)
    parser.add_argument("--ngram-max", type=int, default=SpeculativeConfig.ngram_max)
    parser.add_argument("--speculative-disable-batch-size", type=int, default=SpeculativeConfig.disable_batch_size)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-lines", type=int, default=30, help="lines of code per prompt")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--num-requests-b1", type=int, default=4, help="requests run one at a time for batch 1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--throughput", action="store_true", help="also the throughput workload at batch 256")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    import torch
    from controlplane.serving.tokenizer import load_tokenizer
    from dataplane.config import DataPlaneConfig
    from nanoplane.default_model import default_model_path

    model = args.model or default_model_path()
    tokenizer = load_tokenizer(model)
    dp_config = DataPlaneConfig(model=model, device=args.device, max_num_seqs=256, max_num_batched_tokens=16384,
                                max_model_len=2048)
    dataplane = LocalDataPlane(dp_config)
    facts = dataplane.runner.facts()
    info = {k: getattr(facts, k) for k in ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens",
                                           "max_model_len")}
    eos = tuple(sorted(set(facts.eos_token_ids) | set(tokenizer.eos_token_ids)))
    spec = SpeculativeConfig("ngram", args.num_speculative_tokens, args.ngram_min, args.ngram_max,
                             args.speculative_disable_batch_size)
    sampling = dict(temperature=args.temperature, seed=0 if args.temperature > 0 else None)
    prompts = rewrite_prompts(tokenizer, max(args.batch, args.num_requests_b1), args.max_lines)
    device = torch.cuda.get_device_name() if facts.device.startswith("cuda") else "cpu"
    print(f"model {facts.model_name} on {device} ({facts.dtype}), k = {args.num_speculative_tokens}, "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, max_tokens {args.max_tokens}, "
          f"temperature {args.temperature}", flush=True)
    run(dataplane, info, prompts[:2], [16, 16], sampling, spec, eos)  # warm-up, untimed
    print(f"{'workload':<22} {'tok/s':>9} {'tok/s sp':>9} {'speedup':>8} {'accept':>10} {'len':>8} "
          f"{'steps':>7} {'steps sp':>7} {'same':>6}")
    figures = {"model": facts.model_name, "device": device, "dtype": facts.dtype, "k": args.num_speculative_tokens,
               "max_tokens": args.max_tokens, "temperature": args.temperature, "date": time.strftime("%Y-%m-%d"),
               "rows": []}
    b1 = prompts[:args.num_requests_b1]
    figures["rows"].append(row("copy, batch 1", *(
        one_after_another(dataplane, info, b1, [args.max_tokens] * len(b1), sampling, s, eos) for s in (None, spec))))
    bn = prompts[:args.batch]
    figures["rows"].append(row(f"copy, batch {args.batch}", *(
        run(dataplane, info, bn, [args.max_tokens] * len(bn), sampling, s, eos) for s in (None, spec))))
    if args.throughput:
        random_prompts, max_tokens = workload(256, 1024, 1024)
        vocab = facts.vocab_size
        random_prompts = [[t % vocab for t in p] for p in random_prompts]
        plain_sampling = dict(temperature=0.6, ignore_eos=True)
        figures["rows"].append(row("throughput, batch 256", *(
            run(dataplane, info, random_prompts, max_tokens, plain_sampling, s, eos) for s in (None, spec))))
    for r in figures["rows"]:
        print(json.dumps(r))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))
    dataplane.close()


if __name__ == "__main__":
    main()
