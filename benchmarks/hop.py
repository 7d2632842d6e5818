"""The step hop: round-trip time of one step's plan and result between the planes, over each transport.

Starts a real data plane server process (dataplane/server.py: gRPC and shared-memory
sessions) whose runner is NullRunner below: no model, it answers each plan at once with
random token ids for the sampled entries. So what is timed is only the hop: encode,
transport, decode, the data plane's step loop, and back. Steady decode plans of 1, 64,
256 and 1024 sequences (no token ids in the plan: the data plane holds them); bytes per
step = the encoded plan + the encoded result (protobuf messages for gRPC, without
HTTP/2 framing; raw frames for shared memory).

    python benchmarks/hop.py [--iters 2000] [--json-out hop.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto.step import RUN_SAMPLE, StepPlan, StepResult  # noqa: E402

BATCH_SIZES = (1, 64, 256, 1024)


class NullRunner:
    """A ModelRunner stand-in for this benchmark only: random ids for the sampled entries, no model."""

    def __init__(self, vocab_size: int = 151936, max_num_seqs: int = 1024):
        from dataplane.runner import DataPlaneFacts

        self._facts = DataPlaneFacts(
            model_name="null", model_path="", architecture="null", vocab_size=vocab_size, max_model_len=4096,
            block_size=16, num_kv_blocks=65536, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
            eos_token_ids=[], dtype="none", device="none", attention_backend="none", kv_bytes_per_token=0)
        self._ids = np.random.default_rng(0).integers(0, vocab_size, 1 << 16, dtype=np.int32)

    def facts(self):
        return self._facts

    def reset(self) -> None:
        pass

    def execute(self, plan: StepPlan) -> StepResult:
        sampled = (plan.run_flags & RUN_SAMPLE) != 0
        slots = plan.run_slots[sampled]
        start = plan.step_id * 7 % (len(self._ids) - len(slots))
        return StepResult(step_id=plan.step_id, slots=slots, token_ids=self._ids[start:start + len(slots)])


def serve_null_dataplane(ready_file: str) -> None:
    """The data plane process: the real servers over NullRunner, until killed."""
    from dataplane.server import build_server

    server, port, _ = build_server(NullRunner(), "127.0.0.1", 0)
    server.start()
    Path(ready_file + ".tmp").write_text(str(port))
    os.replace(ready_file + ".tmp", ready_file)
    server.wait_for_termination()


def decode_plan(step_id: int, n: int) -> StepPlan:
    return StepPlan(step_id=step_id, run_slots=np.arange(n, dtype=np.int32), run_num_tokens=np.ones(n, np.int32),
                    run_flags=np.full(n, RUN_SAMPLE, np.uint8))


def bytes_per_step(transport: str, n: int) -> int:
    plan = decode_plan(1, n)
    result = NullRunner().execute(plan)
    if transport == "shm":
        from proto import step_frames
        return step_frames.frame_bytes(step_frames.encode_plan(plan)) + step_frames.frame_bytes(
            step_frames.encode_result(result))
    from proto.nanoplane.v1 import dataplane_pb2
    from proto.step import encode_plan, encode_result
    return (encode_plan(plan, dataplane_pb2.StepPlan).ByteSize()
            + encode_result(result, dataplane_pb2.StepResult).ByteSize())


def measure(target: str, transport: str, iters: int) -> list[dict]:
    from controlplane.link.dataplane_client import DataPlaneClient

    client = DataPlaneClient(target, transport=transport)
    rows = []
    try:
        client.describe(30)
        client.connect()
        assert client.transport_name == transport, client.transport_reason
        step_id = 0
        for n in BATCH_SIZES:
            plans = [decode_plan(i, n) for i in range(step_id, step_id + iters + iters // 10)]
            step_id += len(plans)
            times = []
            for i, plan in enumerate(plans):
                start = time.perf_counter()
                result = client.step(plan)
                elapsed = time.perf_counter() - start
                if i >= iters // 10:  # the first tenth warms up
                    times.append(elapsed)
                assert len(result.token_ids) == n
            us = np.array(times) * 1e6
            rows.append({"transport": transport, "num_seqs": n, "median_us": round(float(np.median(us)), 1),
                         "p99_us": round(float(np.percentile(us, 99)), 1),
                         "bytes_per_step": bytes_per_step(transport, n), "iters": len(times)})
    finally:
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000, help="timed round trips per batch size and transport")
    parser.add_argument("--transports", default="shm,grpc")
    parser.add_argument("--json-out", default="")
    parser.add_argument("--serve-null-dataplane", default="", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.serve_null_dataplane:
        serve_null_dataplane(args.serve_null_dataplane)
        return
    with tempfile.TemporaryDirectory(prefix="nanoplane-hop-") as tmp:
        ready = os.path.join(tmp, "port")
        env = {**os.environ, "NANOPLANE_LOG_LEVEL": "warning"}
        proc = subprocess.Popen([sys.executable, __file__, "--serve-null-dataplane", ready], env=env)
        try:
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    sys.exit("the null data plane exited before it was ready")
                time.sleep(0.05)
            target = f"127.0.0.1:{Path(ready).read_text()}"
            rows = [row for t in args.transports.split(",") for row in measure(target, t, args.iters)]
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'transport':<10}{'seqs':>6}{'median µs':>12}{'p99 µs':>10}{'bytes/step':>12}")
    for r in rows:
        print(f"{r['transport']:<10}{r['num_seqs']:>6}{r['median_us']:>12.1f}{r['p99_us']:>10.1f}"
              f"{r['bytes_per_step']:>12}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
