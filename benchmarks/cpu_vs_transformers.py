"""nanoplane on a CPU against transformers and llama.cpp, end to end, on the same GGUF and the same prompts.

    python benchmarks/cpu_vs_transformers.py                       # the embedded SmolLM2-135M, all engines
    python benchmarks/cpu_vs_transformers.py --engines nanoplane --serve-arg=--num-threads=2
    python benchmarks/cpu_vs_transformers.py --model /models/x.gguf --workloads 1x200,16x128

Engines, each run alone (one after the other, so they never share the cores):
  nanoplane     `nanoplane serve` as a child process (the control plane in it, the data plane its own child),
                driven by the real AsyncClient from this process over gRPC: what a user of `nanoplane serve`
                gets, client included
  transformers  AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in float32, model.generate
                (the tokenizer comes from the GGUF too)
  llama.cpp     llama-cpp-python on the GGUF as it is (its own quantised kernels), when it is installed;
                it has no batched API, so N streams run one after the other
Workloads "NxT": N streams at once, each a prompt of --prompt-len random token ids (fixed by --seed) and
exactly T generated tokens (greedy, ignore_eos / min_new_tokens). A warm-up request runs first.
Prints, per engine and workload, generated tokens / wall seconds (prefill included), and the ratios of
nanoplane to the others.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("nanoplane", "transformers", "llama.cpp")


def parse_workloads(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        streams, _, tokens = item.partition("x")
        out.append((int(streams), int(tokens)))
    return out


def prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = min(10000, vocab_size - 1)
    return [[rng.randint(100, top) for _ in range(length)] for _ in range(num)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- nanoplane ---------------------------------------------------------------------------
async def _nanoplane_run(target: str, batch: list[list[int]], num_tokens: int) -> int:
    from client import AsyncClient, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    async with AsyncClient(target) as client:
        results = await asyncio.gather(*(client.generate(p, params) for p in batch))
    return sum(r.usage.completion_tokens for r in results)


def _wait_until_serving(target: str, process: subprocess.Popen, timeout_s: float) -> None:
    from client import Client, SamplingParams

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nanoplane serve exited with code {process.returncode}")
        try:
            with Client(target, timeout_s=5, retries=0) as client:
                client.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"nanoplane serve did not answer within {timeout_s:.0f} s")


def run_nanoplane(model: str, workloads, batches, serve_args: list[str], log_path: str) -> dict:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("NANOPLANE_LOG_LEVEL", "warning")
    cmd = [sys.executable, "-m", "nanoplane.cli", "serve", "--model", model, "--port", str(port), *serve_args]
    print(f"# nanoplane: {' '.join(cmd[1:])} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_until_serving(target, process, timeout_s=600)
        figures = {}
        for (streams, tokens), batch in zip(workloads, batches):
            asyncio.run(_nanoplane_run(target, batch[:1], 8))  # warm-up
            started = time.perf_counter()
            generated = asyncio.run(_nanoplane_run(target, batch, tokens))
            figures[f"{streams}x{tokens}"] = generated / (time.perf_counter() - started)
        return figures
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# --- transformers ------------------------------------------------------------------------
def run_transformers(model: str, workloads, batches, num_threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(num_threads)
    path = Path(model)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    hf.eval()
    figures = {}
    with torch.inference_mode():
        for (streams, tokens), batch in zip(workloads, batches):
            ids = torch.tensor(batch, dtype=torch.long)
            hf.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
            started = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - started
            figures[f"{streams}x{tokens}"] = (out.shape[1] - ids.shape[1]) * streams / elapsed
    return figures


# --- llama.cpp ---------------------------------------------------------------------------
def llama_cpp_missing() -> str:
    try:
        import llama_cpp  # noqa: F401
        return ""
    except ImportError as e:
        return (f"llama-cpp-python is not installed ({e}); `pip install llama-cpp-python` builds llama.cpp from "
                "source (PyPI has no wheel), minutes on a small machine")


def run_llama_cpp(model: str, workloads, batches, num_threads: int) -> dict:
    from llama_cpp import Llama

    # verbose=False crashed on multi-token prompts in llama-cpp-python 0.3.x, and n_batch=1 avoided a crash in
    # prompt processing: both cost prefill speed only, which these decode-heavy workloads barely see
    llm = Llama(model_path=model, n_ctx=1024, n_threads=num_threads, n_threads_batch=num_threads, n_batch=1,
                seed=0, verbose=True, logits_all=False)
    figures = {}
    for (streams, tokens), batch in zip(workloads, batches):
        _llama_generate(llm, batch[0], 8)  # warm-up
        started = time.perf_counter()
        generated = sum(_llama_generate(llm, prompt, tokens) for prompt in batch)
        figures[f"{streams}x{tokens}"] = generated / (time.perf_counter() - started)
    return figures


def _llama_generate(llm, prompt: list[int], num_tokens: int) -> int:
    llm.reset()
    generated = 0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):  # greedy; EOS is not checked here
        generated += 1
        if generated == num_tokens:
            break
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--workloads", default="1x200,16x128", help="NxT: N streams of T generated tokens each")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=os.cpu_count(),
                        help="threads for transformers and llama.cpp (nanoplane: its own default, or --serve-arg)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an option for `nanoplane serve` (repeatable; write --serve-arg=--flag=value)")
    parser.add_argument("--json-out", default="", help="also write the figures here")
    args = parser.parse_args()

    if not args.model:
        from nanoplane.default_model import default_model_path
        args.model = default_model_path()
    workloads = parse_workloads(args.workloads)
    batches = [prompts(streams, args.prompt_len, 49152, args.seed + i) for i, (streams, _) in enumerate(workloads)]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")

    print(f"# {os.cpu_count()} CPUs, model {args.model}, prompts of {args.prompt_len} tokens, greedy", flush=True)
    results: dict[str, dict] = {}
    for engine in engines:
        if engine == "nanoplane":
            results[engine] = run_nanoplane(args.model, workloads, batches, args.serve_arg,
                                            os.path.join(os.environ.get("TMPDIR", "/tmp"), "cpu_bench_serve.log"))
        elif engine == "transformers":
            results[engine] = run_transformers(args.model, workloads, batches, args.num_threads)
        else:
            missing = llama_cpp_missing()
            if missing:
                print(f"# llama.cpp skipped: {missing}", flush=True)
                continue
            results[engine] = run_llama_cpp(args.model, workloads, batches, args.num_threads)
        print(f"{engine:>12}: " + ", ".join(f"{w} {v:7.1f} tok/s" for w, v in results[engine].items()), flush=True)

    ratios = [e for e in results if e != "nanoplane"] if "nanoplane" in results else []
    print("\n| workload | " + " | ".join([f"{e} tok/s" for e in results] + [f"nanoplane / {e}" for e in ratios]) + " |")
    print("| --- |" + " ---: |" * (len(results) + len(ratios)))
    for streams, tokens in workloads:
        key = f"{streams}x{tokens}"
        row = [f"{results[e][key]:.1f}" for e in results]
        row += [f"{results['nanoplane'][key] / results[e][key]:.2f}" for e in ratios]
        print(f"| {streams} × {tokens} | " + " | ".join(row) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
