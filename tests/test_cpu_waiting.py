"""On a CPU both planes share the cores: neither may burn one while it waits, and the data plane computes with the
threads it was given (issue 17)."""
from __future__ import annotations

import os
import threading
import time

import torch

from client import Client, SamplingParams
from dataplane.config import DataPlaneConfig
from dataplane.cpu_threads import available_cores, resolve_num_threads
from dataplane.main import build_parser
from dataplane.runner import ModelRunner
from dataplane.step_loop import pipelines
from proto.options import config_from_args
from tests.stack import ProcessStack
from tests.test_transport_channel import Pair

BUSY_FRACTION = 0.2  # of one core: a spinning waiter uses ~1.0, a sleeping one a few per cent at most


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def test_a_receiver_waiting_for_a_slow_data_plane_sleeps(tmp_path):
    pair = Pair(tmp_path)  # the control plane's end (client) waits for a step the data plane answers in 1 s
    threading.Timer(1.0, lambda: pair.server.send([b"result"])).start()
    wall, cpu = time.monotonic(), time.thread_time()
    assert pair.client.receive() == b"result"
    wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
    assert wall >= 0.9
    assert cpu / wall < BUSY_FRACTION, f"the waiting thread used {cpu:.2f} s of CPU in {wall:.2f} s"


def test_idle_planes_do_not_spin(tiny_model_dir, tmp_path):
    stack = ProcessStack(str(tiny_model_dir("llama")), tmp_path, "--num-threads", "1")
    try:
        with Client(stack.target, timeout_s=60) as client:  # opens the step session, then leaves it idle
            client.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        time.sleep(0.5)  # the request's last deltas and the data plane's log lines
        before = [process_cpu_s(p.pid) for p in stack.procs]
        wall = time.monotonic()
        time.sleep(1.5)
        wall = time.monotonic() - wall
        used = [process_cpu_s(p.pid) - b for p, b in zip(stack.procs, before)]
    finally:
        stack.close()
    for name, cpu in zip(("data plane", "control plane"), used):
        assert cpu / wall < BUSY_FRACTION, f"the idle {name} used {cpu:.2f} s of CPU in {wall:.2f} s"


def test_num_threads_reaches_torch_and_a_cpu_step_is_not_pipelined(tiny_model_dir):
    assert resolve_num_threads(0, "cpu") == available_cores()
    assert resolve_num_threads(0, "cpu", ranks_on_host=2) == max(1, available_cores() // 2)
    assert resolve_num_threads(0, "cuda") == 0 and resolve_num_threads(3, "cuda") == 3
    args = build_parser().parse_args(["--model", str(tiny_model_dir("llama")), "--device", "cpu",
                                      "--num-threads", "1", "--max-model-len", "64"])
    config = config_from_args(DataPlaneConfig, args)
    assert config.num_threads == 1
    threads = torch.get_num_threads()
    try:
        runner = ModelRunner(config)
        assert torch.get_num_threads() == 1 == runner.num_threads
        assert not pipelines(runner)  # the step ran inside launch(): nothing to overlap it with
    finally:
        torch.set_num_threads(threads)
