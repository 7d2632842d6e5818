"""A tensor-parallel rank > 0: its own ModelRunner over its shard, driven by rank 0's step messages.

Spawned by dataplane/tp_group.py, one process per GPU. It joins the process group,
builds its ModelRunner (which loads its shard, sizes the KV cache and captures CUDA
graphs in step with rank 0), then runs every plan rank 0 publishes: the same model
step, joining the collectives; rank 0 alone samples and answers the control plane, and
broadcasts the sampled ids on the device, which this rank's next decode step reads.
It exits on STOP, and at once when rank 0's process is gone (it may be blocked in a
collective that will never complete, so a thread watches the parent's pid).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import structlog

from dataplane.batch_state import PlanError
from dataplane.config import DataPlaneConfig
from dataplane.distributed import destroy_tensor_parallel, init_tensor_parallel, rank_device
from dataplane.plan_broadcast import EXECUTE, RESET, STOP, PlanReceiver
from proto.logs import configure_logging

log = structlog.get_logger("dataplane.tp_worker")

PARENT_POLL_S = 0.5
# rank 0 rejects a bad plan as this rank does and resets; if it ran the plan instead, it now waits in a
# collective this rank skipped, and only this rank's exit (seen by rank 0's watch) can end that wait
DISAGREEMENT_TIMEOUT_S = 30.0


def worker_main(rank: int, world_size: int, config: DataPlaneConfig, rendezvous_file: str, shm_name: str,
                semaphore, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 stops us
    configure_logging()
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, rank), daemon=True,
                     name="parent-watch").start()
    from dataplane.runner import ModelRunner  # after the watch starts: importing torch takes seconds

    init_tensor_parallel(rank, world_size, rank_device(config.device, rank), rendezvous_file)
    receiver = PlanReceiver(shm_name, world_size - 1, rank - 1, semaphore)
    try:
        runner = ModelRunner(config)
        serve(runner, receiver)
    finally:
        receiver.close()
        destroy_tensor_parallel()
    log.info("tensor-parallel rank stopped", rank=rank)


def serve(runner, receiver: PlanReceiver) -> None:
    rejected: str | None = None
    while True:
        message = receiver.receive(DISAGREEMENT_TIMEOUT_S if rejected else None)
        if message is None or (rejected and message.kind == EXECUTE):
            raise RuntimeError(f"this rank rejected a plan that rank 0 ran ({rejected}): the ranks' batch "
                               "states disagree")
        rejected = None
        if message.kind == STOP:
            return
        if message.kind == RESET:
            runner.reset()
        elif message.kind == EXECUTE:
            try:
                runner.execute(message.plan)
            except (PlanError, ValueError) as e:  # before any collective: rank 0 should reject it too, then reset
                rejected = f"step {message.plan.step_id}: {e}"


def _exit_when_orphaned(parent_pid: int, rank: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    print(f"nanoplane dataplane: tensor-parallel rank {rank}: rank 0 (pid {parent_pid}) is gone; exiting",
          file=sys.stderr, flush=True)
    os._exit(1)
