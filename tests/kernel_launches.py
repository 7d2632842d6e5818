"""Counting the kernels a piece of model code launches, on CPU, to compare code paths (fused or not).

`count_launches()` records, in order, one name per launch a GPU would see: every aten op that
computes something (views, empties and ops on empty tensors launch nothing on a GPU and are left
out) and every Triton kernel launch (compiled, or under the interpreter, whose own torch calls
are not counted). cuBLAS may split one GEMM into two kernels on some shapes and a GPU profile
(benchmarks/step_profile.py) is the last word; this is the structural count, the same on any
machine.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that allocate or reinterpret but run no kernel
NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "_unsafe_view",
             "_local_scalar_dense", "set_", "resize_", "promote_types"}


class _Launches(TorchDispatchMode):
    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.inside_triton or func.is_view or name in NO_KERNEL:
            return out
        results = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [t for t in results if isinstance(t, torch.Tensor)]
        if tensors and all(t.numel() == 0 for t in tensors):
            return out
        self.names.append(f"aten.{name}")
        return out


def _triton_runners():
    from triton.runtime.jit import JITFunction
    runners = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        runners.append(InterpretedFunction)
    except ImportError:
        pass
    return runners


@contextmanager
def count_launches():
    """with count_launches() as names: ... -> names lists the launches, in order."""
    names: list[str] = []
    mode = _Launches(names)
    runners = _triton_runners()
    originals = {cls: cls.run for cls in runners}

    def counted(original):
        def run(self, *args, **kwargs):
            if mode.inside_triton == 0:
                names.append(f"triton.{getattr(self, '__name__', None) or self.fn.__name__}")
            mode.inside_triton += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                mode.inside_triton -= 1
        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        with mode:
            yield names
    finally:
        for cls, original in originals.items():
            cls.run = original
