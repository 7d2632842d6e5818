"""Logprob results: from a StepResult's packed arrays to per-token entries of the sequences that asked.

The data plane returns, for every row that asked, the token's logprob of the model's
raw distribution, its rank and the N most likely tokens (N the most any row of the
step asked for); here each row is trimmed to what its own request asked. Prompt
logprobs come per chunk of a prefill flagged RUN_PROMPT_LOGPROBS; a chunk computed
again (after a preemption) yields entries already sent, which are skipped. The
Engine calls these between the data plane's step and Scheduler.postprocess, while
the sequences still sit at the slots of the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from controlplane.core.sequence import Sequence
from proto.step import RUN_PROMPT_LOGPROBS, StepPlan, StepResult


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens strictly more likely


@dataclass(slots=True, frozen=True)
class PositionLogprobs:
    token: TokenLogprob  # the token at this position
    top: tuple[TokenLogprob, ...]  # the most likely tokens, most likely first


def _entries(token_ids: list[int], logprobs: list[float], ranks: list[int], top_ids: np.ndarray,
             top_logprobs: np.ndarray, num_asked: list[int]) -> list[PositionLogprobs]:
    """One PositionLogprobs per row; row i keeps the first num_asked[i] of its top entries."""
    width = top_ids.shape[1]
    out = []
    for i, (token_id, logprob, rank, n) in enumerate(zip(token_ids, logprobs, ranks, num_asked)):
        n = min(n, width)
        top = tuple(TokenLogprob(t, lp, r + 1) for r, (t, lp) in
                    enumerate(zip(top_ids[i, :n].tolist(), top_logprobs[i, :n].tolist())))
        out.append(PositionLogprobs(TokenLogprob(token_id, logprob, rank), top))
    return out


def sampled_logprobs(result: StepResult, seq_of_row: list[Sequence | None]) -> dict[Sequence, PositionLogprobs]:
    """The sampled token's logprobs of each sequence that asked, keyed by sequence.
    seq_of_row[i]: the sequence at result.slots[i] when the step ran (None if gone)."""
    rows = result.logprob_rows.tolist()
    if not rows:
        return {}
    n = result.num_top_logprobs
    seqs = [seq_of_row[r] for r in rows]
    entries = _entries(result.token_ids[rows].tolist(), result.logprobs.tolist(), result.logprob_ranks.tolist(),
                       result.top_token_ids.reshape(len(rows), n), result.top_logprobs.reshape(len(rows), n),
                       [s.sampling.logprobs if s is not None else 0 for s in seqs])
    return {s: e for s, e in zip(seqs, entries) if s is not None}


def prompt_logprobs(plan: StepPlan, result: StepResult, seq_at_slot: Callable[[int], Sequence | None],
                    run_starts: list[int] | None = None) -> dict[Sequence, list[PositionLogprobs]]:
    """The new prompt logprobs of each sequence whose chunk was flagged, in prompt order;
    advances Sequence.num_prompt_logprobs past them. run_starts: each run entry's first
    position; by default the sequence's computed tokens before the entry (right unless a
    later plan already scheduled more of it, as with overlap)."""
    flagged = np.flatnonzero(plan.run_flags & RUN_PROMPT_LOGPROBS).tolist()
    if not flagged:
        return {}
    n = result.num_top_prompt_logprobs
    top_ids = result.prompt_top_token_ids.reshape(len(result.prompt_logprobs), n)
    top_logprobs = result.prompt_top_logprobs.reshape(len(result.prompt_logprobs), n)
    out: dict[Sequence, list[PositionLogprobs]] = {}
    offset = 0
    for entry, count in zip(flagged, plan.prompt_logprob_counts.tolist()):
        rows = slice(offset, offset + count)
        offset += count
        seq = seq_at_slot(int(plan.run_slots[entry]))
        if seq is None:
            continue
        # the chunk ran tokens [start, start + run_num_tokens); row i predicts token start + 1 + i
        start = (run_starts[entry] if run_starts is not None
                 else seq.num_computed_tokens - int(plan.run_num_tokens[entry]))
        skip = max(0, seq.num_prompt_logprobs - start)  # targets 1 .. num_prompt_logprobs were sent
        if skip >= count:
            continue
        keep = slice(rows.start + skip, rows.stop)
        entries = _entries(plan.prompt_logprob_token_ids[keep].tolist(), result.prompt_logprobs[keep].tolist(),
                           result.prompt_logprob_ranks[keep].tolist(), top_ids[keep], top_logprobs[keep],
                           [seq.sampling.prompt_logprobs or 0] * (count - skip))
        out.setdefault(seq, []).extend(entries)
        seq.num_prompt_logprobs = start + count
    return out
