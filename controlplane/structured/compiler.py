"""Compiles structured-output specs into xgrammar grammars, off the step loop, cached by their text.

Compilation runs on a small thread pool (xgrammar releases the GIL in its C++ code), so
the engine thread never waits for it: the request that asked waits in its gRPC handler,
the others go on. Grammars are kept in an LRU keyed by (kind, text); a compile error is
InvalidStructuredOutput with the compiler's own message, before any token is generated.

JSON is compiled without free whitespace (`any_whitespace=False`): the output is JSON
with single spaces after `:` and `,`, and a small model cannot loop on blank lines.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from controlplane.structured import xgrammar_core
from controlplane.structured.spec import InvalidStructuredOutput, StructuredOutputSpec, StructuredOutputUnavailable

DEFAULT_CACHE_ENTRIES = 256
DEFAULT_COMPILE_THREADS = 2
# xgrammar prefixes its errors with "[time] /path/file.cc:line: "
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


@dataclass(frozen=True, eq=False)
class CompiledStructuredOutput:
    """A compiled grammar and the spec it came from; new_state() gives a sequence its own matcher."""

    spec: StructuredOutputSpec
    compiled: object  # xgrammar CompiledGrammar
    vocab_size: int  # the bitmask covers tokens [0, vocab_size)

    def new_state(self):
        from controlplane.structured.grammar_state import GrammarState

        return GrammarState(self)


def compiler_message(error: Exception) -> str:
    lines = [_LOCATION.sub("", line).strip() for line in str(error).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(error).__name__


class StructuredOutputCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_entries: int = DEFAULT_CACHE_ENTRIES, threads: int = DEFAULT_COMPILE_THREADS):
        self._hf_tokenizer = hf_tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._threads = threads
        self.vocab_size = vocab_size
        self._compiler = None  # made by the first compile (a second or so): servers that never use it pay nothing
        self._cache: OrderedDict[StructuredOutputSpec, CompiledStructuredOutput] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar-compile")
        self.num_compiled = 0  # cache misses, for tests and metrics
        self.num_cache_hits = 0

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids) -> "StructuredOutputCompiler":
        return cls(tokenizer.hf, vocab_size, sorted(set(eos_token_ids)))

    def compile(self, spec: StructuredOutputSpec) -> CompiledStructuredOutput:
        """Blocking; raises InvalidStructuredOutput with the compiler's message."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.num_cache_hits += 1
                return hit
        try:
            compiled = self._compile(spec)
        except InvalidStructuredOutput:
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidStructuredOutput(spec.field, compiler_message(e)) from e
        result = CompiledStructuredOutput(spec, compiled, self.vocab_size)
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = result
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return result

    async def compile_async(self, spec: StructuredOutputSpec) -> CompiledStructuredOutput:
        """compile() on the pool: the caller's event loop and the engine thread go on meanwhile."""
        with self._lock:
            hit = self._cache.get(spec)
        if hit is not None:
            return self.compile(spec)  # a dict lookup: not worth a thread hop
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile, spec)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _xgrammar_compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    xg = xgrammar_core.load()
                except ImportError as e:
                    raise StructuredOutputUnavailable(xgrammar_core.INSTALL_HINT) from e
                info = xg.TokenizerInfo.from_huggingface(self._hf_tokenizer, vocab_size=self.vocab_size,
                                                         stop_token_ids=self._stop_token_ids or None)
                self._compiler = xg.GrammarCompiler(info, max_threads=self._threads, cache_enabled=False)
            return self._compiler

    def _compile(self, spec: StructuredOutputSpec):
        c, kind = self._xgrammar_compiler(), spec.kind
        if kind == "json_schema":
            return c.compile_json_schema(spec.text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False, strict_mode=True)
        if kind == "regex":
            return c.compile_regex(spec.text)
        if kind == "grammar":
            return c.compile_grammar(spec.text)
        # choice: a grammar of string literals (EBNF literals take JSON's escapes)
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choices))
