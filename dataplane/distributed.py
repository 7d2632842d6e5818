"""Tensor-parallel rank and size for the layers, the collectives they need, and the group's set-up.

Without an initialised torch.distributed process group everything is a single rank
(rank 0 of 1), so the same model code runs on CPU, on one GPU, and on several.
`init_tensor_parallel` joins one process to the group: NCCL on GPUs, gloo on CPU
(so CI runs the multi-rank code path with two CPU processes). dataplane/tp_group.py
starts the processes; each rank's device is `rank_device`.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Callable

import structlog
import torch
import torch.distributed as dist

log = structlog.get_logger("dataplane.distributed")

DESTROY_TIMEOUT_S = 10.0


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_rank() -> int:
    return dist.get_rank() if _initialised() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def local_num_kv_heads(total_num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: its share, or one replicated head when there are fewer heads than ranks
    (vLLM's rule: each head then serves tp_size / total_num_kv_heads ranks)."""
    if total_num_kv_heads >= tp_size:
        return divide(total_num_kv_heads, tp_size)
    if tp_size % total_num_kv_heads:
        raise ValueError(f"the tensor-parallel size {tp_size} is neither a divisor nor a multiple of the "
                         f"model's {total_num_kv_heads} KV heads")
    return 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x in place over the tensor-parallel group; a no-op on a single rank."""
    if get_tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_to_rank0(x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's x, in rank order, on rank 0; None on the other ranks. [x] on a single rank."""
    if get_tp_size() == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(get_tp_size())] if get_tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return parts


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x, copied in place into x on every other rank; a no-op on a single rank."""
    if get_tp_size() > 1:
        dist.broadcast(x, src=0)
    return x


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's value (ranks must agree on sizes such as the KV cache's block count)."""
    if get_tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank_device(name: str, rank: int) -> torch.device:
    """The device of a rank: rank r of a data plane on "cuda" (or "cuda:N") uses GPU r (or N + r)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU")
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"rank {rank} needs GPU {index}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, rendezvous_file: str,
                         timeout_s: float = 600.0) -> None:
    """Joins this process to the group as `rank`; every rank calls it with the same file and size."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(rendezvous_file, world_size)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))


_before_destroy: list[Callable[[], None]] = []


def call_before_destroy(release: Callable[[], None]) -> None:
    """Registers what must go before the group: CUDA graphs that captured NCCL collectives hold the
    communicator, and ncclCommDestroy then waits forever (pytorch/pytorch#115388)."""
    _before_destroy.append(release)


def destroy_tensor_parallel() -> None:
    # gloo aborts the process at exit when its group was never destroyed
    if not _initialised():
        return
    while _before_destroy:
        _before_destroy.pop()()
    # should a communicator still hang in its destructor, shutting down matters more than a tidy teardown
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True, name="tp-destroy")
    teardown.start()
    teardown.join(DESTROY_TIMEOUT_S)
    if teardown.is_alive():
        log.warning("the tensor-parallel process group did not shut down in time; exiting without it",
                    timeout_s=DESTROY_TIMEOUT_S)
