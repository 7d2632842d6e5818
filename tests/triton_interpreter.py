"""Running Triton kernels on a machine without CUDA, under Triton's interpreter, for the kernel tests.

@triton.jit picks interpreter or compiler when a function is decorated, triton.language's own helpers
(tl.cdiv, tl.max, ...) included, so TRITON_INTERPRET must be set before triton is first imported.
torch._dynamo imports triton, so earlier tests may have done it already; then triton's Python modules
(not its native extension) are imported again with the interpreter on, and so are kernel modules
decorated before that (kernel_module)."""
from __future__ import annotations

import importlib
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()


def use_interpreter_without_cuda() -> None:
    """On a machine without CUDA, makes the next imports of triton interpret kernels (no-op with CUDA,
    or without triton installed: the caller's importorskip then says so)."""
    if HAS_CUDA:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    if not isinstance(tl.cdiv, InterpretedFunction):
        for name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
            del sys.modules[name]


def kernel_module(name: str):
    """Imports a module of @triton.jit kernels; without CUDA, imports it again if its kernels were
    decorated before the interpreter was on."""
    module = importlib.import_module(name)
    if not HAS_CUDA:
        from triton.runtime.interpreter import InterpretedFunction
        kernel = next(v for k, v in vars(module).items() if k.endswith("_kernel"))
        if not isinstance(kernel, InterpretedFunction):
            module = importlib.reload(module)
    return module


def interpreter_numpy_compat():
    """Triton 3.6's interpreter turns a scalar into an index with int() on a 1-element array,
    which NumPy >= 2.4 refuses; loops like `range(start, end, BLOCK_N)` then fail. Index by .item()."""
    from triton.runtime import interpreter
    if getattr(interpreter._patch_lang_tensor, "nanoplane_compat", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.nanoplane_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor

