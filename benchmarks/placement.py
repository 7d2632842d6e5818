"""Placement policies over several data planes: prefix-cache hit rate and throughput on a mixed workload.

    python benchmarks/placement.py                          # 3 CPU data planes, a tiny random model
    python benchmarks/placement.py --num-dataplanes 2 --num-requests 400 --device cuda
    python benchmarks/placement.py --prefix-load-slack 0.25,0.5,1 --repeats 2   # the prefix policy's load slack

Starts N data planes (`nanoplane dataplane`, random weights, `--load-format dummy`) once,
then for each policy a control plane in this process in front of all of them (a new
control plane starts every data plane from an empty KV cache), and sends the same
workload at a fixed concurrency: `--num-groups` groups of requests that share a long
system prefix (`--prefix-len` tokens) each followed by a short unique question, mixed with
requests of unique prompts (`--unique-fraction`), in a seeded random order. Reported per
policy: the prefix-cache hit rate (cached prompt tokens / prompt tokens, from each
response's usage), output tokens per second, requests per second, and the mean TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.random_model import write_random_model  # noqa: E402

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 4096, "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "float32", "bos_token_id": 4094,
    "eos_token_id": 4095, "hidden_act": "silu",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dataplanes(args, model: Path, log_dir: Path) -> list[tuple[subprocess.Popen, str]]:
    import grpc
    planes = []
    for i in range(args.num_dataplanes):
        port = free_port()
        cmd = [sys.executable, "-m", "nanoplane.cli", "dataplane", "--model", str(model), "--load-format", "dummy",
               "--port", str(port), "--device", args.device, "--num-kv-blocks", str(args.num_kv_blocks),
               "--block-size", "16", "--max-num-seqs", str(args.max_num_seqs), "--num-threads", "1"]
        log = open(log_dir / f"dataplane{i}.log", "w")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        planes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), f"127.0.0.1:{port}"))
    for proc, target in planes:
        grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=300)
    return planes


def workload(args) -> list[list[int]]:
    rng = random.Random(args.seed)
    vocab = TINY_QWEN3["vocab_size"] - 2
    prefixes = [[rng.randrange(vocab) for _ in range(args.prefix_len)] for _ in range(args.num_groups)]
    prompts = []
    for _ in range(args.num_requests):
        if rng.random() < args.unique_fraction:
            prompts.append([rng.randrange(vocab) for _ in range(args.prefix_len + args.question_len)])
        else:
            prompts.append(rng.choice(prefixes) + [rng.randrange(vocab) for _ in range(args.question_len)])
    return prompts


def run_policy(args, policy: str, targets: list[str], model: Path, prompts: list[list[int]]) -> dict:
    from client import Client, SamplingParams
    from controlplane.config import ControlPlaneConfig
    from controlplane.main import start_control_plane

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = ControlPlaneConfig(dataplane=",".join(targets), tokenizer=str(model), port=0, placement=policy)
    config.validate()
    running = asyncio.run_coroutine_threadsafe(start_control_plane(config), loop).result(300)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout_s=600) as client:
            ttfts = []

            def one(prompt):
                sent, first, usage = time.monotonic(), None, None
                for delta in client.generate_stream(prompt, params):
                    first = first or time.monotonic()
                    usage = delta.usage or usage
                ttfts.append(first - sent)
                return usage

            start = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                usages = list(pool.map(one, prompts))
            elapsed = time.monotonic() - start
        placed = [e.num_steps for e in running.router.engines]
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace_s=1), loop).result(60)  # the loop's thread is a daemon
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    return {"policy": policy, "hit_rate": sum(u.cached_prompt_tokens for u in usages) / prompt_tokens,
            "output_tok_s": sum(u.completion_tokens for u in usages) / elapsed,
            "requests_s": len(prompts) / elapsed, "mean_ttft_ms": 1e3 * sum(ttfts) / len(ttfts),
            "elapsed_s": elapsed, "steps_per_dataplane": placed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-dataplanes", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-kv-blocks", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=240)
    parser.add_argument("--num-groups", type=int, default=6)
    parser.add_argument("--prefix-len", type=int, default=320)
    parser.add_argument("--question-len", type=int, default=24)
    parser.add_argument("--unique-fraction", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--policies", default="round-robin,least-loaded,prefix")
    parser.add_argument("--prefix-load-slack", default="",
                        help="comma-separated values of placement.PREFIX_LOAD_SLACK to run the prefix policy with "
                             "(set in this process; a benchmark knob, not a server option); default: the module's")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every policy, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="warning", help="of the control plane in this process (its logs go to "
                        "stderr; the data planes' to their files)")
    args = parser.parse_args()
    from proto.logs import configure_logging

    configure_logging(args.log_level)  # one JSON line per policy on stdout, nothing else
    prompts = workload(args)
    with tempfile.TemporaryDirectory(prefix="placement-") as tmp:
        model = write_random_model(Path(tmp) / "model", TINY_QWEN3)
        planes = start_dataplanes(args, model, Path(tmp))
        try:
            from controlplane.serving import placement

            slacks = [float(x) for x in args.prefix_load_slack.split(",")] if args.prefix_load_slack \
                else [placement.PREFIX_LOAD_SLACK]
            runs = [(p, slack) for p in args.policies.split(",") for slack in (slacks if p == "prefix" else [None])]
            for _ in range(args.repeats):
                for policy, slack in runs:
                    if slack is not None:
                        placement.PREFIX_LOAD_SLACK = slack
                    result = {**run_policy(args, policy, [t for _, t in planes], model, prompts),
                              **({"prefix_load_slack": slack} if slack is not None else {})}
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                          flush=True)
        finally:
            for proc, _ in planes:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
