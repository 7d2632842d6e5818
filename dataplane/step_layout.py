"""Where each token and each sampled row of a step sits, from the plan's run arrays alone.

A step's layout (which entry each token belongs to, which rows sample, which tokens read their
slot's last sampled token, the attention's query layout) depends on run_slots, run_num_tokens,
run_flags and spec_num_drafts only, not on how far each sequence has got; BatchState
(dataplane/batch_state.py) adds the positions. A steady decode runs the same entries step after
step, so `StepLayouts.of(plan)` returns the last layout again while those arrays are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proto.step import RUN_SAMPLE, RUN_SPECULATIVE, RUN_TOKENS_IN_PLAN, StepPlan


@dataclass(slots=True, frozen=True)
class StepLayout:
    slots: np.ndarray  # i64 [num_entries]
    counts: np.ndarray  # i64 [num_entries]: tokens each entry runs
    cu_seqlens: np.ndarray  # i64 [num_entries + 1]
    entry_of_token: np.ndarray  # i64 [num_tokens]
    offset_of_token: np.ndarray  # i64 [num_tokens]: its index within its entry
    token_slots: np.ndarray  # i64 [num_tokens]
    token_in_plan: np.ndarray  # bool [num_tokens]: its id comes with the plan (not a decode's last sampled token)
    decode_rows: np.ndarray | None  # i64: tokens that read their slot's last sampled token; None when none does
    decode_slots: np.ndarray | None  # i64: those slots
    # a sampling entry samples its last row; a speculative one its last drafts + 1 rows (docs/speculative.md)
    rows_per_entry: np.ndarray  # i64 [num_sampling_entries]
    row_entry: np.ndarray  # i64 [num_sampled]: the entry of each sampled row
    row_back: np.ndarray  # i64 [num_sampled]: k-th row from the end of its entry (0 = the last)
    sample_rows: np.ndarray  # i64 [num_sampled]: rows of the hidden states to sample from
    sampled_slots: np.ndarray  # i64 [num_sampled]
    samples_every_row: bool  # sample_rows is 0, 1, ..., num_tokens - 1
    any_speculative: bool
    # a decode step with drafts: each token becomes a one-token query over its slot's blocks that sees the
    # context up to itself (every token's KV is stored before attention in each layer), which is the causal
    # verification, run by the decode kernels and their CUDA graphs
    one_query_per_token: bool
    max_query_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.entry_of_token)


def layout_of(plan: StepPlan) -> StepLayout:
    slots = plan.run_slots.astype(np.int64)
    counts = plan.run_num_tokens.astype(np.int64)
    in_plan = (plan.run_flags & RUN_TOKENS_IN_PLAN) != 0
    sample = (plan.run_flags & RUN_SAMPLE) != 0
    spec = (plan.run_flags & RUN_SPECULATIVE) != 0
    cu_seqlens = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(counts, out=cu_seqlens[1:])
    num_tokens = int(cu_seqlens[-1])
    entry_of_token = np.repeat(np.arange(len(slots)), counts)
    token_in_plan = in_plan[entry_of_token]
    all_in_plan = bool(np.all(in_plan))

    rows_per_entry = sample.astype(np.int64)
    rows_per_entry[spec] += plan.spec_num_drafts
    rows_per_entry = rows_per_entry[sample]
    row_entry = np.repeat(np.flatnonzero(sample), rows_per_entry)
    row_back = np.repeat(np.cumsum(rows_per_entry), rows_per_entry) - 1 - np.arange(int(rows_per_entry.sum()))
    sample_rows = cu_seqlens[1:][row_entry] - 1 - row_back
    any_speculative = bool(np.any(spec))
    one_query_per_token = any_speculative and bool(np.all(spec | (counts == 1)))
    layout = StepLayout(
        slots=slots, counts=counts, cu_seqlens=cu_seqlens, entry_of_token=entry_of_token,
        offset_of_token=np.arange(num_tokens) - cu_seqlens[entry_of_token], token_slots=slots[entry_of_token],
        token_in_plan=token_in_plan,
        decode_rows=None if all_in_plan else np.flatnonzero(~token_in_plan),
        decode_slots=None if all_in_plan else slots[~in_plan],
        rows_per_entry=rows_per_entry, row_entry=row_entry, row_back=row_back, sample_rows=sample_rows,
        sampled_slots=slots[row_entry],
        samples_every_row=bool(np.array_equal(sample_rows, np.arange(num_tokens))),
        any_speculative=any_speculative, one_query_per_token=one_query_per_token,
        max_query_len=1 if one_query_per_token else int(counts.max()),
    )
    for name in StepLayout.__slots__:  # StepLayouts hands the same arrays to later steps
        value = getattr(layout, name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return layout


_KEY_ARRAYS = ("run_slots", "run_num_tokens", "run_flags", "spec_num_drafts")


class StepLayouts:
    """layout_of, remembering its last answer."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._layout: StepLayout | None = None

    def of(self, plan: StepPlan) -> StepLayout:
        key = tuple((a.dtype.str, a.shape, a.tobytes()) for a in (getattr(plan, name) for name in _KEY_ARRAYS))
        if key != self._key:
            self._layout, self._key = layout_of(plan), key
        return self._layout
