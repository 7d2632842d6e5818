"""A sequence's grammar matcher, and the plan's bitmasks of the rows that sample under one.

The matcher has accepted exactly the sequence's known output tokens: the Scheduler plans a
constrained sequence's sampling step only when no token of it is in flight (the overlap
note in docs/structured_output.md), fills its row of the plan's bitmask from the matcher,
and advances it with each token postprocess appends. A matcher that accepts a stop token,
or has nothing left to accept, ends the sequence.
"""
from __future__ import annotations

import os
import time

import numpy as np

from controlplane.structured import xgrammar_core
from proto.step import PLAN_ARRAYS, RUN_SAMPLE, StepPlan

_BATCH_MIN_ROWS = 8  # below this, one thread fills the rows faster than the pool's hand-off


class GrammarState:
    __slots__ = ("grammar", "matcher", "num_accepted")

    def __init__(self, grammar):
        self.grammar = grammar  # CompiledStructuredOutput
        self.matcher = xgrammar_core.load().core.GrammarMatcher(grammar.compiled._handle, None, False, -1, None)
        self.num_accepted = 0

    def accept(self, token_id: int) -> bool:
        """Advances the matcher; False when the grammar refuses the token (it was not in the mask)."""
        ok = self.matcher.accept_token(token_id, False)
        self.num_accepted += ok
        return ok

    @property
    def is_terminated(self) -> bool:
        """It accepted a stop token, or the grammar is complete and allows nothing more."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row, False)


class BitmaskFiller:
    """Fills the bitmask rows of many matchers, on xgrammar's thread pool when the batch is large."""

    def __init__(self, threads: int = 0):
        self.threads = threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._batch = None
        self.total_s = 0.0  # time spent filling, for the benchmark and metrics
        self.num_rows = 0

    def fill(self, states: list[GrammarState], vocab_size: int) -> np.ndarray:
        """A [len(states), ceil(vocab_size / 32)] int32 array, row i the tokens states[i] allows."""
        t0 = time.perf_counter()
        words = (vocab_size + 31) // 32
        bitmask = np.empty((len(states), words), dtype=np.int32)
        if len(states) < _BATCH_MIN_ROWS or self.threads == 1:
            for i, state in enumerate(states):
                state.fill(bitmask, i)
        else:
            if self._batch is None:
                self._batch = xgrammar_core.load().core.BatchGrammarMatcher(self.threads)
            self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask, None, False)
        self.total_s += time.perf_counter() - t0
        self.num_rows += len(states)
        return bitmask


def add_grammar_masks(plan: StepPlan, run_slots: list[int], run_flags: list[int], seq_at_slot: list,
                      filler: BitmaskFiller) -> None:
    """Sets plan.grammar_rows / grammar_bitmask: the allowed tokens of each constrained row that samples
    this step (grammar_rows index the plan's sampled rows, in run order)."""
    rows: list[int] = []
    states: list[GrammarState] = []
    row = 0
    for slot, flags in zip(run_slots, run_flags):
        if flags & RUN_SAMPLE:
            grammar = seq_at_slot[slot].grammar
            if grammar is not None:
                rows.append(row)
                states.append(grammar)
            row += 1
    if states:
        plan.grammar_rows = np.asarray(rows, dtype=PLAN_ARRAYS["grammar_rows"])
        plan.grammar_bitmask = filler.fill(states, states[0].grammar.vocab_size).reshape(-1)
