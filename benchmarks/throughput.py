"""Offline throughput on Nano-vLLM's bench.py workload, through the real two-process split.

    python benchmarks/throughput.py                 # data plane as its own process, gRPC between the planes
    python benchmarks/throughput.py --in-process    # the same engine without the process boundary

Workload (docs/design.md): random.seed(0); 256 sequences; prompt lengths U[100, 1024] of token
ids U[0, 10000]; max_tokens U[100, 1024]; ignore_eos; temperature 0.6 -> 133,966 output
tokens. Model: Qwen3-0.6B architecture with random bf16 weights unless --model or
--model-arch (qwen3-30b-a3b, llama3-8b: random weights too) is given; --quantization fp8 and
--kv-cache-dtype fp8 pass to the data plane.

--structured json-schema constrains every request by one JSON schema (STRUCTURED_SCHEMA,
docs/structured_output.md), with SmolLM2's tokenizer for the grammar unless --model has
its own; the grammar ends a sequence early only if the model closes the JSON and then
samples EOS. The figures then add the control plane's bitmask time per step and per row.

Prints output tokens, seconds, tok/s, and the fraction of the memory-bandwidth lower
bound: every decode step reads the weights once and every generated token reads the KV
of its whole context once; bytes / the device's measured copy bandwidth is the floor.
With a --model-arch it also prints the fraction of the roofline (benchmarks/roofline.py):
per step the larger of bytes / bandwidth and FLOPs / peak, experts actually touched for MoE.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions, Sequence  # noqa: E402
from benchmarks.roofline import ARCHS, QWEN3_0_6B, ModelShape, StepShape, measured_peak_flops, roofline_s  # noqa: E402


def workload(num_seqs: int, max_input_len: int, max_output_len: int):
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def lower_bound_s(prompts, max_tokens, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float) -> float:
    """Bytes every decode step must read (weights once per step, each token's whole context of KV)."""
    kv_tokens_read = sum(o * len(p) + o * (o - 1) // 2 for p, o in zip(prompts, max_tokens))
    num_steps = max(max_tokens)  # all sequences decode side by side when the KV cache holds them
    return (num_steps * weight_bytes + kv_tokens_read * kv_bytes_per_token) / bandwidth


def copy_bandwidth(device) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (B/s)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    src = torch.randn(512 * 2**20 // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


class LocalDataPlane:
    """The data plane without the process boundary: plans go straight to a ModelRunner."""

    def __init__(self, config):
        from dataplane.tp_group import start_runner

        self.runner = start_runner(config)  # a ModelRunner, or rank 0's TensorParallelRunner

    def close(self):
        getattr(self.runner, "close", lambda: None)()

    def open_stream(self):
        self.runner.reset()
        self._pending = collections.deque()

    def send(self, plan):
        # launch returns before the sampled ids reach the host (dataplane/runner.py), as the step loop uses it
        launch = getattr(self.runner, "launch", None)
        self._pending.append(launch(plan) if launch else self.runner.execute(plan))

    def receive(self):
        pending = self._pending.popleft()
        return pending.result() if hasattr(pending, "result") else pending

    def step(self, plan):
        self.send(plan)
        return self.receive()


# --sampling penalties: what issue 5 asks the cost of, on every request
PENALTIES = dict(top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)


# --structured json-schema: nested objects, arrays, an enum, bounded numbers, free strings
STRUCTURED_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 100},
    "kind": {"type": "string", "enum": ["a", "b", "c"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
             "required": ["ok"]}}, "required": ["name", "score", "kind"]}}


def structured_sampling(model_dir: str | None, vocab_size: int) -> dict:
    """SamplingOptions fields constraining a request by STRUCTURED_SCHEMA, compiled once."""
    from controlplane.serving.tokenizer import load_tokenizer
    from controlplane.structured.compiler import StructuredOutputCompiler
    from controlplane.structured.spec import StructuredOutputSpec
    from nanoplane.default_model import default_model_path

    tokenizer = load_tokenizer(model_dir or default_model_path())
    compiler = StructuredOutputCompiler.for_tokenizer(tokenizer, vocab_size, tokenizer.eos_token_ids)
    return {"structured_output": compiler.compile(StructuredOutputSpec("json_schema", json.dumps(STRUCTURED_SCHEMA)))}


LAST_SCHEDULER: list = []  # the timed run's scheduler, for its bitmask figures


def run_engine(dataplane, info: dict, prompts, max_tokens, temperature: float,
               extra_sampling: dict | None = None, steps: list[StepShape] | None = None) -> tuple[int, float]:
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info["num_kv_blocks"], block_size=info["block_size"], max_num_seqs=info["max_num_seqs"],
        max_num_batched_tokens=info["max_num_batched_tokens"], max_model_len=info["max_model_len"]))
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        scheduler.add(Sequence(f"s{i}", p, SamplingOptions(max_tokens=m, temperature=temperature, ignore_eos=True,
                                                            **(extra_sampling or {}))))
    dataplane.open_stream()  # a fresh batch on the data plane for this scheduler
    LAST_SCHEDULER[:] = [scheduler]
    num_tokens = 0
    start = time.perf_counter()
    while scheduler.has_unfinished() or scheduler.in_flight:
        num_tokens += len(overlapped_step(scheduler, dataplane, steps))
    return num_tokens, time.perf_counter() - start


def overlapped_step(scheduler: Scheduler, dataplane, steps: list[StepShape] | None = None) -> list:
    """The Engine's step without its streams: send plan N+1, then take N's result (one step in flight).
    steps: where to note each plan's shape for the roofline."""
    plan = scheduler.schedule()
    if plan is not None:
        dataplane.send(plan)
        if steps is not None:
            runs = scheduler.in_flight[-1].runs
            steps.append(StepShape(tuple(runs.starts), tuple(runs.num_tokens), plan.num_sampled))
    if len(scheduler.in_flight) > (1 if plan is not None else 0):
        return scheduler.postprocess(scheduler.in_flight[0].plan, dataplane.receive())
    return []


def profile(dataplane, info: dict, prompts, max_tokens, num_steps: int) -> None:
    """Where a step's time goes: the first steps prefill, so profile the steady decode after them."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info["num_kv_blocks"], block_size=info["block_size"], max_num_seqs=info["max_num_seqs"],
        max_num_batched_tokens=info["max_num_batched_tokens"], max_model_len=info["max_model_len"]))
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        scheduler.add(Sequence(f"s{i}", p, SamplingOptions(max_tokens=m, temperature=0.6, ignore_eos=True)))
    dataplane.open_stream()

    def one_step():
        overlapped_step(scheduler, dataplane)

    while scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        one_step()
    for _ in range(5):
        one_step()
    timings = []
    for _ in range(num_steps):
        t = time.perf_counter()
        one_step()
        timings.append(time.perf_counter() - t)
    print(f"decode step wall time at {scheduler.num_running} running: median {1e3 * sorted(timings)[len(timings) // 2]:.2f} ms")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            one_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


def dataplane_args(args, model_dir: str) -> list[str]:
    out = ["--model", model_dir, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", "4096"]
    if args.dummy:
        out += ["--load-format", "dummy"]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if args.attention_backend:
        out += ["--attention-backend", args.attention_backend]
    if args.tensor_parallel_size > 1:
        out += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    out += ["--quantization", args.quantization, "--kv-cache-dtype", args.kv_cache_dtype]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder; default: Qwen3-0.6B architecture, random weights")
    parser.add_argument("--model-arch", choices=sorted(ARCHS), default="qwen3-0.6b",
                        help="architecture of the random-weight model when --model is not given")
    parser.add_argument("--quantization", default="auto", help="the data plane's --quantization (auto, none, fp8)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="the data plane's --kv-cache-dtype (auto, fp8)")
    parser.add_argument("--in-process", action="store_true", help="no process boundary between the planes")
    parser.add_argument("--transport", choices=("auto", "shm", "grpc"), default="auto",
                        help="split mode: how plans and results travel (auto = shared memory on one host)")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs per data plane; the bound then counts the bandwidth of all of them")
    parser.add_argument("--sampling", choices=("plain", "penalties"), default="plain",
                        help="plain: temperature 0.6 only (Nano-vLLM's); penalties: also top-p 0.9 and "
                             "repetition/presence/frequency penalties on every request")
    parser.add_argument("--structured", choices=("none", "json-schema"), default="none",
                        help="json-schema: every request constrained by STRUCTURED_SCHEMA (structured output)")
    parser.add_argument("--json-out", default=None, help="also write the figures here as JSON")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many steps of the workload with torch.profiler instead of timing it")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="nanoplane-bench-")
    args.dummy = args.model is None
    model_dir = args.model or tmp
    if args.dummy:
        Path(tmp, "config.json").write_text(json.dumps(ARCHS[args.model_arch]))
    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)

    from dataplane.config import DataPlaneConfig
    from dataplane.main import build_parser
    from proto.options import config_from_args

    dp_config = config_from_args(DataPlaneConfig, build_parser().parse_args(dataplane_args(args, model_dir)))
    proc = None
    if args.in_process:
        dataplane = LocalDataPlane(dp_config)
        facts = dataplane.runner.facts()
        info = {k: getattr(facts, k) for k in ("num_kv_blocks", "block_size", "max_num_seqs",
                                               "max_num_batched_tokens", "max_model_len", "kv_bytes_per_token")}
    else:
        from controlplane.link.dataplane_client import DataPlaneClient

        ready = os.path.join(tmp, "port")
        proc = subprocess.Popen([sys.executable, "-m", "dataplane", "--port", "0", "--ready-file", ready,
                                 *dataplane_args(args, model_dir)], cwd=Path(__file__).resolve().parents[1])
        while not os.path.exists(ready):
            if proc.poll() is not None:
                sys.exit("the data plane exited before it was ready")
            time.sleep(0.2)
        dataplane = DataPlaneClient(f"127.0.0.1:{open(ready).read()}", transport=args.transport)
        pb = dataplane.describe(600)
        dataplane.connect()
        info = {k: getattr(pb, k) for k in ("num_kv_blocks", "block_size", "max_num_seqs",
                                            "max_num_batched_tokens", "max_model_len", "kv_bytes_per_token")}
    extra = dict(PENALTIES) if args.sampling == "penalties" else {}
    if args.structured == "json-schema":
        extra |= structured_sampling(args.model, ARCHS[args.model_arch]["vocab_size"] if args.dummy
                                     else json.loads(Path(model_dir, "config.json").read_text())["vocab_size"])
    try:
        # warm-up, untimed: Triton compiles a kernel variant per new specialisation (e.g. a
        # batch of 1, a multiple of 16, neither), on the first step that needs it
        run_engine(dataplane, info, [prompts[0][:100]], [16], 0.6)
        run_engine(dataplane, info, prompts[:33], [8] * 33, 0.6, extra)
        if args.profile_steps:
            profile(dataplane, info, prompts, max_tokens, args.profile_steps)
            return
        print(f"timed run starts at {time.strftime('%H:%M:%S')}", file=sys.stderr)
        steps: list[StepShape] = []
        num_tokens, seconds = run_engine(dataplane, info, prompts, max_tokens, 0.6, extra, steps)
    finally:
        dataplane.close()
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth(device) * args.tensor_parallel_size  # each GPU reads its shard
    h = ARCHS[args.model_arch] if args.dummy else QWEN3_0_6B
    shape = ModelShape.from_hf(h)
    # every decode step of a full batch reads every weight (and every expert) once; FP8 linear layers 1 byte each
    weight_bytes = shape.step_bytes(10**9, 0, 1.0 if args.quantization == "fp8" else 2.0, 0)
    bound = lower_bound_s(prompts, max_tokens, weight_bytes, info["kv_bytes_per_token"], bandwidth)
    figures = {
        "mode": "in-process" if args.in_process else f"split ({dataplane.transport_name})",
        "tensor_parallel_size": args.tensor_parallel_size,
        "sampling": args.sampling,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda" else "cpu", "output_tokens": num_tokens, "seconds": round(seconds, 3),
        "tok_per_s": round(num_tokens / seconds, 1), "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
        "lower_bound_s": round(bound, 3), "fraction_of_bound": round(bound / seconds, 3),
        "num_kv_blocks": info["num_kv_blocks"], "block_size": info["block_size"],
        "model_arch": args.model_arch if args.dummy else args.model, "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype, "structured": args.structured,
    }
    if args.dummy:
        fp8 = args.quantization == "fp8"
        peak = measured_peak_flops(device, fp8) * args.tensor_parallel_size
        roofline = roofline_s(steps, shape, 1.0 if fp8 else 2.0, info["kv_bytes_per_token"], bandwidth, peak)
        figures.update(peak_TFLOPs=round(peak / 1e12, 1), roofline_s=round(roofline, 3),
                       fraction_of_roofline=round(roofline / seconds, 3), num_steps=len(steps))
        print(f"roofline (per step max of bytes/bandwidth and FLOPs/peak, {'FP8' if fp8 else 'bf16'} peak "
              f"{peak / 1e12:.0f} TFLOP/s): {roofline:.2f}s, {100 * roofline / seconds:.1f}% of it")
    if args.structured != "none":
        filler = LAST_SCHEDULER[0].bitmask_filler
        num_steps = LAST_SCHEDULER[0].plan_builder.next_step_id
        figures |= {"mask_rows": filler.num_rows, "mask_threads": filler.threads,
                    "mask_ms_per_step": round(1e3 * filler.total_s / max(num_steps, 1), 3),
                    "mask_us_per_row": round(1e6 * filler.total_s / max(filler.num_rows, 1), 2),
                    "mask_share_of_time": round(filler.total_s / seconds, 4)}
    print(json.dumps(figures))
    print(f"Total: {num_tokens} tok, Time: {seconds:.2f}s, Throughput: {num_tokens / seconds:.2f} tok/s, "
          f"{100 * bound / seconds:.1f}% of the memory-bandwidth bound ({bound:.2f}s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
