"""Tensor-parallel rank and size for the layers, and the one collective they need.

Without an initialised torch.distributed process group everything is a single rank
(rank 0 of 1), so the same model code runs on CPU, on one GPU, and later on several.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


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


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x in place over the tensor-parallel group; a no-op on a single rank."""
    if get_tp_size() > 1:
        dist.all_reduce(x)
    return x
