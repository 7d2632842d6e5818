"""xgrammar without torch: its compiler and matchers, for the control plane.

xgrammar's package __init__ imports its matcher module, which imports torch (for the
bitmask helpers the control plane does not use). The control plane never imports torch
(it runs on a slim image), so when torch is not already loaded this module imports
xgrammar's torch-free parts by hand: an empty `xgrammar` package whose __path__ is the
real one, then its native binding, tokenizer info and compiler modules. Matchers are
made from the native core directly; bitmasks are numpy int32 arrays (DLPack).
In a process that already has torch (the offline LLM, tests) the real package is used.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from functools import cache


# xgrammar's wheel requires torch; the control plane needs only its native core and Python front
INSTALL_HINT = ("structured output needs xgrammar on the control plane: "
                "pip install --no-deps 'xgrammar>=0.2.9' && pip install apache-tvm-ffi pydantic")


@dataclass(frozen=True)
class XGrammar:
    core: object  # the native binding: GrammarMatcher, BatchGrammarMatcher, ...
    TokenizerInfo: type
    GrammarCompiler: type


def _torch_free_package() -> None:
    if "xgrammar" in sys.modules:
        return
    spec = importlib.util.find_spec("xgrammar")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(INSTALL_HINT)
    package = types.ModuleType("xgrammar")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "xgrammar"
    package.__file__ = spec.origin
    sys.modules["xgrammar"] = package
    importlib.import_module("xgrammar.load_binding")  # loads the native library; base.py needs it first


@cache
def load() -> XGrammar:
    if sys.modules.get("torch") is not None:
        import xgrammar  # noqa: F401  (the whole package, as its authors meant)
    else:
        _torch_free_package()
    base = importlib.import_module("xgrammar.base")
    tokenizer_info = importlib.import_module("xgrammar.tokenizer_info")
    compiler = importlib.import_module("xgrammar.compiler")
    return XGrammar(base._core, tokenizer_info.TokenizerInfo, compiler.GrammarCompiler)
