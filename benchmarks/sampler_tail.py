"""Times the sampling tail on one GPU: sampler.py's torch path against the fused kernels, on bf16 logits.

Cases at 256 rows of Qwen3's vocabulary (151936) by default: temperature 0.6 alone (fused_sample.py),
top-p 0.9, top-p 0.9 with throughput.py's penalties on every row (a PenaltyState holding ~1000 prompt
and ~500 output tokens per row), and top-k 50 + top-p 0.9 + min-p 0.05 with penalties (every filter's
search). The torch path is Sampler.sample with NANOPLANE_DISABLE_FUSED_OPS=1: the float32 copy, the
penalties as tensor ops, the full sort; the fused one is fused_sample.py (temperature) or fused_tail.py
called directly, whether or not Sampler.sample routes the case to it. Each call is timed with CUDA events
(triton.testing.do_bench, median). One JSON line per case. --sweep also times the fused tail on the
penalties + top-p case at other tiles (tokens per chunk, probes per search pass, warps), to choose
fused_tail.py's defaults.

    PYTHONPATH=. python3 benchmarks/sampler_tail.py [--rows 256] [--vocab 151936] [--logit-scale 3] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from triton.testing import do_bench

from dataplane.layers.fused_ops import DISABLE_ENV
from dataplane.sampling import fused_tail
from dataplane.sampling.penalties import PenaltyState, RowPenalties
from dataplane.sampling.sampler import GREEDY_TEMPERATURE, Sampler, mix_seeds, plan_sampling

PENALTIES = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)  # throughput.py's
CASES = {  # name: (temperature, top_p, top_k, min_p, penalties)
    "temperature": (0.6, 1.0, -1, 0.0, False),
    "top_p": (0.6, 0.9, -1, 0.0, False),
    "top_p+penalties": (0.6, 0.9, -1, 0.0, True),
    "top_k+top_p+min_p+penalties": (0.6, 0.9, 50, 0.05, True),
}


def penalty_state(rows: int, vocab: int, prompt_len: int, output_len: int) -> PenaltyState:
    rng = np.random.default_rng(0)
    state = PenaltyState(rows, vocab, torch.device("cuda"))
    slots = np.arange(rows)
    state.reset(slots)
    per_row = prompt_len + output_len
    tokens = torch.from_numpy(rng.integers(0, vocab, rows * per_row)).cuda()
    is_prompt = np.tile(np.arange(per_row) < prompt_len, rows)
    state.observe(tokens, np.repeat(slots, per_row), is_prompt)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--logit-scale", type=float, default=3.0, help="logits ~ N(0, scale^2), rounded to bf16")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--output-tokens", type=int, default=500)
    parser.add_argument("--sweep", action="store_true", help="also time other fused_tail tiles")
    args = parser.parse_args()
    n, vocab = args.rows, args.vocab
    logits = (args.logit_scale * torch.randn(n, vocab, device="cuda")).to(torch.bfloat16)
    state = penalty_state(n, vocab, args.prompt_tokens, args.output_tokens)
    everyone = torch.arange(n, device="cuda")
    penalties = RowPenalties(state, everyone, everyone.clone(),
                             {k: torch.full((n,), v, device="cuda") for k, v in PENALTIES.items()})
    generator = torch.Generator(device="cuda").manual_seed(0)
    sampler = Sampler()
    for name, (temperature, top_p, top_k, min_p, with_penalties) in CASES.items():
        params = dict(temperature=torch.full((n,), temperature, device="cuda"),
                      top_p=torch.full((n,), top_p, device="cuda"),
                      top_k=torch.full((n,), top_k, dtype=torch.int32, device="cuda"),
                      min_p=torch.full((n,), min_p, device="cuda"),
                      seed=torch.zeros(n, dtype=torch.int64, device="cuda"),
                      has_seed=torch.zeros(n, dtype=torch.bool, device="cuda"),
                      positions=torch.zeros(n, dtype=torch.int64, device="cuda"))
        host = {k: v.cpu().numpy() for k, v in params.items()}
        plan = plan_sampling(host["temperature"], host["top_p"], host["top_k"], host["min_p"], host["has_seed"], vocab,
                             lambda rows: torch.from_numpy(rows).cuda())
        case_penalties = penalties if with_penalties else None
        torch_step = lambda: sampler.sample(logits, **params, generator=generator, plan=plan,  # noqa: E731
                                            penalties=case_penalties)
        # the fused kernel itself, whether or not Sampler.sample routes this case to it
        fused_step = torch_step if name == "temperature" else lambda: fused_tail.sample(  # noqa: E731
            logits, params["temperature"], params["top_p"], params["top_k"], params["min_p"], params["has_seed"],
            params["seed"], generator, greedy_below=GREEDY_TEMPERATURE, penalties=case_penalties)
        result = {"case": name, "rows": n, "vocab": vocab, "dtype": "bf16"}
        for path, disabled, step in (("torch", "1", torch_step), ("fused", "0", fused_step)):
            os.environ[DISABLE_ENV] = disabled
            result[f"{path}_ms"] = round(do_bench(step, warmup=25, rep=200, return_mode="median"), 4)
        result["speedup"] = round(result["torch_ms"] / result["fused_ms"], 2)
        result["device"] = torch.cuda.get_device_name()
        print(json.dumps(result), flush=True)
        if args.sweep and name == "top_p+penalties":
            sweep(logits, params, penalties, generator)


def sweep(logits, params, penalties, generator) -> None:
    keys = mix_seeds(params["seed"], params["positions"])
    for block_v in (512, 1024, 2048):
        for probes in (8, 16, 32):
            for num_warps in (4, 8, 16):
                step = lambda: fused_tail.sample(  # noqa: E731
                    logits, params["temperature"], params["top_p"], params["top_k"], params["min_p"],
                    params["has_seed"], keys, generator, greedy_below=GREEDY_TEMPERATURE, penalties=penalties,
                    block_v=block_v, probes=probes, num_warps=num_warps)
                try:
                    ms = round(do_bench(step, warmup=10, rep=100, return_mode="median"), 4)
                except Exception as e:  # a tile that does not compile (registers, shared memory) is skipped
                    ms = repr(e)[:120]
                print(json.dumps({"sweep": "top_p+penalties", "block_v": block_v, "probes": probes,
                                  "num_warps": num_warps, "fused_ms": ms}), flush=True)


if __name__ == "__main__":
    main()
