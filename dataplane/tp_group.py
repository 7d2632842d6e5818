"""Tensor parallelism on rank 0: starts ranks 1..N-1, joins the group, and fans each step out to them.

`start_runner(config)` is what the data plane's main calls: a plain ModelRunner for
--tensor-parallel-size 1, else a TensorParallelRunner, which the gRPC servicer uses the
same way. Each plan goes to the other ranks through shared memory
(dataplane/plan_broadcast.py) before rank 0 runs it, so all ranks run the step at once.

A rank that dies leaves the others blocked in a collective that never completes, so a
thread waits on the workers' process sentinels; when one exits unasked, it logs which,
stops the other ranks and exits the process with status 1 (the control plane sees the
stream break). The workers exit by themselves when rank 0 dies (dataplane/tp_worker.py).
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
from typing import Callable

import numpy as np
import structlog

from dataplane.config import DataPlaneConfig
from dataplane.distributed import destroy_tensor_parallel, init_tensor_parallel, rank_device
from dataplane.plan_broadcast import EXECUTE, RESET, STOP, PlanBroadcast, encode_execute
from dataplane.tp_worker import worker_main
from proto.step import StepPlan, StepResult

log = structlog.get_logger("dataplane.tp_group")

STOP_TIMEOUT_S = 30.0
_NO_IDS = np.zeros(0, np.int32)  # the message's sampled-ids arrays: unused since ids travel by broadcast


def start_runner(config: DataPlaneConfig):
    """-> ModelRunner (TP 1) or TensorParallelRunner (which also has close); both launch, execute, reset, facts."""
    from dataplane.runner import ModelRunner

    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    group = TensorParallelGroup(config)
    try:
        return TensorParallelRunner(group, ModelRunner(config))
    except BaseException:
        group.close()
        raise


def _exit_on_worker_death(message: str) -> None:
    print(f"nanoplane dataplane: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # rank 0's threads may be blocked in a collective with the dead rank: no clean unwind exists


class TensorParallelGroup:
    """The worker processes, the shared-memory broadcast to them, and the watch over them."""

    def __init__(self, config: DataPlaneConfig, on_worker_death: Callable[[str], None] = _exit_on_worker_death):
        size = config.tensor_parallel_size
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA or gRPC threads
        self._tmpdir = tempfile.mkdtemp(prefix="nanoplane-tp-")
        rendezvous = os.path.join(self._tmpdir, "rendezvous")
        semaphores = [ctx.Semaphore(0) for _ in range(size - 1)]
        self.broadcast = PlanBroadcast(size - 1, config.max_message_bytes, semaphores)
        self.workers = [ctx.Process(target=worker_main, name=f"nanoplane-tp-rank{rank}", daemon=True,
                                    args=(rank, size, config, rendezvous, self.broadcast.name,
                                          semaphores[rank - 1], os.getpid()))
                        for rank in range(1, size)]
        self._closing = False
        self._on_worker_death = on_worker_death
        for worker in self.workers:
            worker.start()
        log.info("started tensor-parallel ranks", tp_size=size, pids=[w.pid for w in self.workers])
        threading.Thread(target=self._watch, daemon=True, name="tp-watch").start()
        init_tensor_parallel(0, size, rank_device(config.device, 0), rendezvous)

    def workers_alive(self) -> bool:
        return all(w.is_alive() for w in self.workers)

    def publish(self, kind: int, parts: list[bytes] = ()) -> None:
        if self._closing:
            raise RuntimeError("the tensor-parallel ranks are stopping")
        self.broadcast.publish(kind, list(parts), self.workers_alive)

    def _watch(self) -> None:
        sentinels = {w.sentinel: rank for rank, w in enumerate(self.workers, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[ready[0]]
        worker = self.workers[rank - 1]
        worker.join(1)
        message = (f"tensor-parallel rank {rank} (pid {worker.pid}) exited with code {worker.exitcode}; "
                   f"the data plane cannot run without it and stops")
        log.error("tensor-parallel rank died", rank=rank, pid=worker.pid, exitcode=worker.exitcode)
        self._stop_workers(timeout_s=2.0)
        self._release()
        self._on_worker_death(message)

    def close(self) -> None:
        """Stops the workers (STOP, then terminate what lingers) and leaves the process group."""
        if self._closing:
            return
        if self.workers_alive():
            try:
                self.publish(STOP)
            except RuntimeError as e:
                log.warning("could not send STOP to the tensor-parallel ranks", error=str(e))
        self._closing = True
        self._stop_workers(STOP_TIMEOUT_S)
        destroy_tensor_parallel()
        self._release()

    def _stop_workers(self, timeout_s: float) -> None:
        self._closing = True
        for worker in self.workers:
            worker.join(timeout_s)
            if worker.is_alive():
                worker.kill()
                worker.join(5)

    def _release(self) -> None:
        self.broadcast.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


class TensorParallelRunner:
    """Rank 0's ModelRunner as the servicer sees it: each call goes to the other ranks first."""

    def __init__(self, group: TensorParallelGroup, runner):
        self.group = group
        self.runner = runner
        self._lock = threading.Lock()  # one message in the segment at a time; close waits for a step being launched

    def facts(self):
        return self.runner.facts()

    @property
    def launch_returns_early(self) -> bool:
        return self.runner.launch_returns_early

    def reset(self) -> None:
        with self._lock:
            self.group.publish(RESET)
            self.runner.reset()

    def launch(self, plan: StepPlan):
        """Rank 0's launch, after the plan went to the other ranks. They need no ids from the host: rank 0
        broadcasts what it samples on the device (dataplane/sampling/sampling_step.py), so steps may overlap."""
        with self._lock:
            self.group.publish(EXECUTE, encode_execute(plan, _NO_IDS, _NO_IDS))
            return self.runner.launch(plan)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def close(self) -> None:
        with self._lock:
            self.group.close()
