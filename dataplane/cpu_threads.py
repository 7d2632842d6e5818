"""How many threads torch computes with, decided once per data plane process.

On a CPU the data plane is where the work is: the control plane beside it (same host, as
`nanoplane serve` runs them) imports no torch, blocks on a socket or a condition while it
waits, and needs a core only for the short stretch between steps. So by default the data
plane takes every core this process may run on (its CPU affinity, which a container's
cpuset narrows, rather than the host's count), shared out between the tensor-parallel ranks
of this host. torch's inter-op pool stays at one thread: nothing in a step runs ops
concurrently, and a pool per core would be threads idling in the same cores.
On a GPU the host threads only feed the device: torch's default stands unless
--num-threads says otherwise.
"""
from __future__ import annotations

import os

import structlog
import torch

log = structlog.get_logger("dataplane.cpu_threads")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), or the machine's where that cannot be known."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_num_threads(requested: int, device_type: str, ranks_on_host: int = 1) -> int:
    """--num-threads: requested when > 0; for 0 on a CPU, this host's cores shared between its ranks; for 0 on
    a GPU, 0 (torch's own default)."""
    if requested > 0:
        return requested
    if device_type != "cpu":
        return 0
    return max(1, available_cores() // max(1, ranks_on_host))


def set_torch_threads(num_threads: int) -> int:
    """Sets torch's intra-op threads (0 leaves torch's default) and one inter-op thread; returns the intra-op
    count torch now uses."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only possible before any inter-op work: a second runner in one process (tests)
        pass
    return torch.get_num_threads()
