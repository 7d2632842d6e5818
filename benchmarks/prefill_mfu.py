"""Prefill model-FLOPs utilisation: 8 prompts of 4,096 tokens in one step, in-process.

    python benchmarks/prefill_mfu.py                      # Llama-3-8B architecture, random bf16 weights
    python benchmarks/prefill_mfu.py --arch qwen3-0.6b

A step is the control plane's schedule + the data plane's execute (which returns the sampled ids on
the host). FLOPs counted: 2 x (every linear layer's parameters) per prompt token, the causal attention's
QK^T and PV (2 x 2 x layers x heads x head_dim x sum of s^2 / 2), and the LM head for the one sampled
position per prompt. MFU = FLOPs / step time / the bf16 matmul rate measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import QWEN3_0_6B, LocalDataPlane  # noqa: E402
from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions, Sequence  # noqa: E402

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}
ARCHS = {"llama3-8b": LLAMA3_8B, "qwen3-0.6b": QWEN3_0_6B}


def linear_params(h: dict) -> int:
    """Parameters of every linear layer a prompt token passes through (not the embedding, not the LM head)."""
    q, kv = h["num_attention_heads"] * h["head_dim"], h["num_key_value_heads"] * h["head_dim"]
    per_layer = h["hidden_size"] * (q + 2 * kv) + q * h["hidden_size"] + 3 * h["hidden_size"] * h["intermediate_size"]
    return h["num_hidden_layers"] * per_layer


def prefill_flops(h: dict, prompt_lens: list[int]) -> float:
    dense = 2 * linear_params(h) * sum(prompt_lens)
    attention = 2 * 2 * h["num_hidden_layers"] * h["num_attention_heads"] * h["head_dim"] * sum(
        s * s / 2 for s in prompt_lens)
    lm_head = 2 * h["hidden_size"] * h["vocab_size"] * len(prompt_lens)
    return dense + attention + lm_head


def matmul_peak_flops() -> float:
    """bf16 matmul rate on this device (FLOP/s), the median of 20 8192^3 products."""
    import torch

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / float(np.median(times))


def prefill_step_s(dataplane: LocalDataPlane, prompt_lens: list[int], vocab_size: int, seed: int) -> float:
    facts = dataplane.runner.facts()
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=facts.num_kv_blocks, block_size=facts.block_size, max_num_seqs=facts.max_num_seqs,
        max_num_batched_tokens=facts.max_num_batched_tokens, max_model_len=facts.max_model_len))
    rng = np.random.default_rng(seed)  # fresh prompts: nothing comes from the prefix cache
    for i, n in enumerate(prompt_lens):
        scheduler.add(Sequence(f"s{i}", rng.integers(0, vocab_size, n).tolist(),
                               SamplingOptions(max_tokens=1, temperature=0.0, ignore_eos=True)))
    dataplane.open_stream()
    start = time.perf_counter()
    plan = scheduler.schedule()
    assert int(plan.run_num_tokens.sum()) == sum(prompt_lens), "the prompts must fit one step"
    result = dataplane.step(plan)
    seconds = time.perf_counter() - start
    scheduler.postprocess(plan, result)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from dataplane.config import DataPlaneConfig
    from dataplane.main import build_parser
    from proto.options import config_from_args

    h = ARCHS[args.arch]
    tmp = tempfile.mkdtemp(prefix="nanoplane-mfu-")
    Path(tmp, "config.json").write_text(json.dumps(h))
    num_tokens = args.num_prompts * args.prompt_len
    argv = ["--model", tmp, "--load-format", "dummy", "--max-num-seqs", str(max(args.num_prompts, 16)),
            "--max-num-batched-tokens", str(num_tokens), "--max-model-len", str(args.prompt_len + 16),
            "--warm-up", "off"]
    if args.attention_backend:
        argv += ["--attention-backend", args.attention_backend]
    dataplane = LocalDataPlane(config_from_args(DataPlaneConfig, build_parser().parse_args(argv)))
    try:
        lens = [args.prompt_len] * args.num_prompts
        prefill_step_s(dataplane, lens, h["vocab_size"], seed=0)  # compiles the kernels
        times = [prefill_step_s(dataplane, lens, h["vocab_size"], seed=1 + i) for i in range(args.repeats)]
    finally:
        dataplane.close()
    import torch

    peak = matmul_peak_flops()
    seconds = float(np.median(times))
    flops = prefill_flops(h, lens)
    figures = {"arch": args.arch, "device": torch.cuda.get_device_name(), "num_prompts": args.num_prompts,
               "prompt_len": args.prompt_len, "step_ms_median": round(1e3 * seconds, 2),
               "step_ms_all": [round(1e3 * t, 2) for t in times], "tflops_counted": round(flops / 1e12, 2),
               "achieved_tflops": round(flops / seconds / 1e12, 1), "peak_tflops": round(peak / 1e12, 1),
               "mfu": round(flops / seconds / peak, 3), "prefill_tok_per_s": round(num_tokens / seconds)}
    print(json.dumps(figures))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
