"""The step protocol as plain data: what the control plane asks of the data plane each step.

Both planes speak in these dataclasses; `encode_*`/`decode_*` are the only place
they meet protobuf. Every array is a 1-D numpy array of the dtype named in
PLAN_ARRAYS / RESULT_ARRAYS, and travels as packed little-endian bytes.

A plan carries only what changed (docs/design.md, "The step protocol"):
- `drop_slots`: sequences leaving the batch (finished, aborted, preempted);
- `new_*`: sequences entering the batch at a slot, with their sampling params and
  how many of their tokens already sit in the KV cache (prefix-cache hit);
- `block_*`: block-table writes, `block_tables[slot][index] = id`;
- `run_*`: the sequences that run this step, in batch order, each with its number
  of tokens and flags; `token_ids` holds the tokens of entries flagged
  RUN_TOKENS_IN_PLAN (prefill chunks). Other entries are decodes of the token the
  data plane sampled last for that slot, so a steady decode step sends no ids.
- `stop_ids`, `cached_token_ids`, `prompt_logprob_*`: variable-length extras of the
  new entries and of entries flagged RUN_PROMPT_LOGPROBS (dataplane.proto says how
  they line up); docs/sampling.md says what the sampling fields mean.
- `grammar_rows`, `grammar_bitmask`: structured output's allowed tokens of the
  constrained sampled rows, packed 32 tokens to an int32 word (docs/structured_output.md).
- `spec_num_drafts`: speculative decoding (docs/speculative.md): entries flagged
  RUN_SPECULATIVE end with that many draft tokens and sample all of their last
  drafts + 1 rows; `rewind_*` take back the KV of drafts a result rejected.

A result carries the sampled ids and, for sequences that asked, logprobs of the
model's raw distribution (`logprob_rows` names the rows that have them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass

import numpy as np

from proto.sampling_schema import COLUMNS, uses_penalties

# run_flags bits
RUN_SAMPLE = 1  # sample a token after this entry's last token
RUN_TOKENS_IN_PLAN = 2  # the entry's tokens are in plan.token_ids
RUN_PROMPT_LOGPROBS = 4  # return logprobs of the prompt tokens the entry's rows predict
RUN_SPECULATIVE = 8  # the entry's last spec_num_drafts tokens are drafts: sample each of its last drafts + 1 rows

PLAN_ARRAYS: dict[str, np.dtype] = {
    "drop_slots": np.dtype("<i4"),
    "new_slots": np.dtype("<i4"),
    "new_num_cached_tokens": np.dtype("<i4"),
    "new_num_prompt_tokens": np.dtype("<i4"),
    "new_num_stop_ids": np.dtype("<i4"),
    # the sampling options the data plane needs, one column each (proto/sampling_schema.py)
    **{column.field: np.dtype(column.dtype) for column in COLUMNS},
    "block_slots": np.dtype("<i4"),
    "block_indices": np.dtype("<i4"),
    "block_ids": np.dtype("<i4"),
    "run_slots": np.dtype("<i4"),
    "run_num_tokens": np.dtype("<i4"),
    "run_flags": np.dtype("u1"),
    "token_ids": np.dtype("<i4"),
    "stop_ids": np.dtype("<i4"),
    "cached_token_ids": np.dtype("<i4"),
    "prompt_logprob_counts": np.dtype("<i4"),
    "prompt_logprob_token_ids": np.dtype("<i4"),
    "grammar_rows": np.dtype("<i4"),
    "grammar_bitmask": np.dtype("<i4"),
    "spec_num_drafts": np.dtype("<i4"),
    "rewind_slots": np.dtype("<i4"),
    "rewind_num_tokens": np.dtype("<i4"),
}
# one entry per new sequence; defaults for a plan built without them
NEW_SEQUENCE_ARRAYS = tuple(name for name in PLAN_ARRAYS if name.startswith("new_") and name != "new_slots")

RESULT_ARRAYS: dict[str, np.dtype] = {
    "slots": np.dtype("<i4"),
    "token_ids": np.dtype("<i4"),
    "logprob_rows": np.dtype("<i4"),
    "logprobs": np.dtype("<f4"),
    "logprob_ranks": np.dtype("<i4"),
    "top_token_ids": np.dtype("<i4"),
    "top_logprobs": np.dtype("<f4"),
    "prompt_logprobs": np.dtype("<f4"),
    "prompt_logprob_ranks": np.dtype("<i4"),
    "prompt_top_token_ids": np.dtype("<i4"),
    "prompt_top_logprobs": np.dtype("<f4"),
}


_EMPTY: dict[np.dtype, np.ndarray] = {}


def empty_array(dtype: np.dtype) -> np.ndarray:
    """A read-only empty array of dtype, one shared by all (cheaper than a new one per field and plan): plan and
    result arrays are never written in place, and those decoded from the wire are read-only as well."""
    if dtype not in _EMPTY:
        _EMPTY[dtype] = np.zeros(0, dtype)
        _EMPTY[dtype].flags.writeable = False
    return _EMPTY[dtype]


def _empty(dtype: np.dtype):
    empty = empty_array(dtype)
    return field(default_factory=lambda: empty)


class _StepPlanMethods:
    """One step's plan: `step_id` and one 1-D array per PLAN_ARRAYS entry, named as there
    (dataplane.proto's StepPlan); the sampling columns come from proto/sampling_schema.py."""

    __slots__ = ()

    @property
    def num_sampled(self) -> int:
        """Entries that sample (a speculative entry counts once: see num_sampled_rows)."""
        return int(np.count_nonzero(self.run_flags & RUN_SAMPLE))

    @property
    def num_sampled_rows(self) -> int:
        """Rows of the result: one per sampling entry, plus one per draft of the speculative ones."""
        return self.num_sampled + int(self.spec_num_drafts.sum())

    @property
    def new_uses_penalties(self) -> np.ndarray:
        """bool per new sequence: some penalty is on (its cached tokens are in cached_token_ids)."""
        return np.asarray(uses_penalties(lambda name: getattr(self, "new_" + name)), dtype=bool)

    def check(self) -> None:
        """Raises ValueError when the arrays are inconsistent with each other."""
        n_new = len(self.new_slots)
        for name in NEW_SEQUENCE_ARRAYS:
            if len(getattr(self, name)) != n_new:
                raise ValueError(f"plan {self.step_id}: {name} has {len(getattr(self, name))} entries, new_slots {n_new}")
        if not len(self.block_slots) == len(self.block_indices) == len(self.block_ids):
            raise ValueError(f"plan {self.step_id}: block_slots, block_indices and block_ids differ in length")
        if not len(self.run_slots) == len(self.run_num_tokens) == len(self.run_flags):
            raise ValueError(f"plan {self.step_id}: run_slots, run_num_tokens and run_flags differ in length")
        in_plan = (self.run_flags & RUN_TOKENS_IN_PLAN) != 0
        want = int(self.run_num_tokens[in_plan].sum())
        if want != len(self.token_ids):
            raise ValueError(f"plan {self.step_id}: entries in plan need {want} token ids, got {len(self.token_ids)}")
        if np.any(self.run_num_tokens[~in_plan] != 1):
            raise ValueError(f"plan {self.step_id}: an entry without tokens in the plan must run exactly 1 token")
        if np.any(self.run_num_tokens < 1):
            raise ValueError(f"plan {self.step_id}: every run entry must run at least 1 token")
        if np.any(self.run_flags & ~np.uint8(RUN_SAMPLE | RUN_TOKENS_IN_PLAN | RUN_PROMPT_LOGPROBS | RUN_SPECULATIVE)):
            raise ValueError(f"plan {self.step_id}: run_flags has bits that mean nothing")
        self._check_new_values()
        self._check_extras(in_plan)

    def _check_new_values(self) -> None:
        """Each new sequence's numbers in the ranges the control plane's validation allows (docs/sampling.md)."""
        with np.errstate(invalid="ignore"):  # NaN compares False: it fails every range below
            checks = (
                ("new_num_cached_tokens", self.new_num_cached_tokens >= 0, ">= 0"),
                ("new_num_prompt_tokens", self.new_num_prompt_tokens >= 0, ">= 0"),
                ("new_temperature", np.isfinite(self.new_temperature) & (self.new_temperature >= 0),
                 "a finite number >= 0"),
                ("new_top_p", (self.new_top_p > 0) & (self.new_top_p <= 1), "in (0, 1]"),
                ("new_top_k", (self.new_top_k == -1) | (self.new_top_k >= 1), "-1 (off) or >= 1"),
                ("new_min_p", (self.new_min_p >= 0) & (self.new_min_p <= 1), "in [0, 1]"),
                ("new_repetition_penalty", np.isfinite(self.new_repetition_penalty) & (self.new_repetition_penalty > 0),
                 "a finite number > 0"),
                ("new_presence_penalty", np.isfinite(self.new_presence_penalty), "finite"),
                ("new_frequency_penalty", np.isfinite(self.new_frequency_penalty), "finite"),
                ("new_min_tokens", self.new_min_tokens >= 0, ">= 0"),
                ("new_num_logprobs", self.new_num_logprobs >= -1, ">= -1 (-1 = none)"),
                ("new_num_prompt_logprobs", self.new_num_prompt_logprobs >= -1, ">= -1 (-1 = none)"),
                ("new_has_seed", self.new_has_seed <= 1, "0 or 1"),
            )
        for name, ok, rule in checks:
            if not np.all(ok):
                raise ValueError(f"plan {self.step_id}: {name} must be {rule}, got {getattr(self, name)[~ok][0]}")

    def _check_extras(self, in_plan: np.ndarray) -> None:
        if np.any(self.new_num_stop_ids < 0) or int(self.new_num_stop_ids.sum()) != len(self.stop_ids):
            raise ValueError(f"plan {self.step_id}: new_num_stop_ids add up to {int(self.new_num_stop_ids.sum())}, "
                             f"stop_ids has {len(self.stop_ids)}")
        want = int(self.new_num_cached_tokens[self.new_uses_penalties].sum())
        if want != len(self.cached_token_ids):
            raise ValueError(f"plan {self.step_id}: new entries with penalties have {want} cached tokens, "
                             f"cached_token_ids has {len(self.cached_token_ids)}")
        flagged = (self.run_flags & RUN_PROMPT_LOGPROBS) != 0
        if len(self.prompt_logprob_counts) != int(flagged.sum()):
            raise ValueError(f"plan {self.step_id}: {int(flagged.sum())} entries flagged RUN_PROMPT_LOGPROBS, "
                             f"prompt_logprob_counts has {len(self.prompt_logprob_counts)}")
        if np.any(flagged & ~in_plan):
            raise ValueError(f"plan {self.step_id}: RUN_PROMPT_LOGPROBS on an entry without tokens in the plan")
        counts = self.prompt_logprob_counts
        if np.any(counts < 1) or np.any(counts > self.run_num_tokens[flagged]):
            raise ValueError(f"plan {self.step_id}: prompt_logprob_counts must be in [1, the entry's tokens]")
        if int(counts.sum()) != len(self.prompt_logprob_token_ids):
            raise ValueError(f"plan {self.step_id}: prompt_logprob_counts add up to {int(counts.sum())}, "
                             f"prompt_logprob_token_ids has {len(self.prompt_logprob_token_ids)}")
        self._check_grammar()
        self._check_speculative(in_plan)

    def _check_speculative(self, in_plan: np.ndarray) -> None:
        spec = (self.run_flags & RUN_SPECULATIVE) != 0
        if len(self.spec_num_drafts) != int(spec.sum()):
            raise ValueError(f"plan {self.step_id}: {int(spec.sum())} entries flagged RUN_SPECULATIVE, "
                             f"spec_num_drafts has {len(self.spec_num_drafts)}")
        if np.any(spec & ~(in_plan & ((self.run_flags & RUN_SAMPLE) != 0))):
            raise ValueError(f"plan {self.step_id}: a RUN_SPECULATIVE entry must sample and carry its tokens")
        if np.any(spec & ((self.run_flags & RUN_PROMPT_LOGPROBS) != 0)):
            raise ValueError(f"plan {self.step_id}: RUN_SPECULATIVE cannot be combined with RUN_PROMPT_LOGPROBS")
        if np.any(self.spec_num_drafts < 1) or np.any(self.spec_num_drafts >= self.run_num_tokens[spec]):
            raise ValueError(f"plan {self.step_id}: spec_num_drafts must be in [1, the entry's tokens - 1]")
        if len(self.rewind_slots) != len(self.rewind_num_tokens):
            raise ValueError(f"plan {self.step_id}: rewind_slots and rewind_num_tokens differ in length")
        if np.any(self.rewind_num_tokens < 1):
            raise ValueError(f"plan {self.step_id}: rewind_num_tokens must be at least 1")

    def _check_grammar(self) -> None:
        rows, n_rows = self.grammar_rows, len(self.grammar_rows)
        if not n_rows:
            if len(self.grammar_bitmask):
                raise ValueError(f"plan {self.step_id}: grammar_bitmask without grammar_rows")
            return
        if len(self.grammar_bitmask) % n_rows or not len(self.grammar_bitmask):
            raise ValueError(f"plan {self.step_id}: grammar_bitmask has {len(self.grammar_bitmask)} words, "
                             f"not a positive multiple of its {n_rows} grammar_rows")
        if rows.min() < 0 or rows.max() >= self.num_sampled or np.any(np.diff(rows) <= 0):
            raise ValueError(f"plan {self.step_id}: grammar_rows must be increasing indices of sampled entries "
                             f"in [0, {self.num_sampled})")

    @property
    def grammar_words_per_row(self) -> int:
        return len(self.grammar_bitmask) // len(self.grammar_rows) if len(self.grammar_rows) else 0


StepPlan = make_dataclass("StepPlan", [("step_id", int), *((n, np.ndarray, _empty(d)) for n, d in PLAN_ARRAYS.items())],
                          bases=(_StepPlanMethods,), slots=True,
                          namespace={"__doc__": _StepPlanMethods.__doc__, "__module__": __name__})


@dataclass(slots=True)
class StepResult:
    step_id: int
    slots: np.ndarray = _empty(RESULT_ARRAYS["slots"])
    token_ids: np.ndarray = _empty(RESULT_ARRAYS["token_ids"])
    logprob_rows: np.ndarray = _empty(RESULT_ARRAYS["logprob_rows"])
    logprobs: np.ndarray = _empty(RESULT_ARRAYS["logprobs"])
    logprob_ranks: np.ndarray = _empty(RESULT_ARRAYS["logprob_ranks"])
    top_token_ids: np.ndarray = _empty(RESULT_ARRAYS["top_token_ids"])
    top_logprobs: np.ndarray = _empty(RESULT_ARRAYS["top_logprobs"])
    prompt_logprobs: np.ndarray = _empty(RESULT_ARRAYS["prompt_logprobs"])
    prompt_logprob_ranks: np.ndarray = _empty(RESULT_ARRAYS["prompt_logprob_ranks"])
    prompt_top_token_ids: np.ndarray = _empty(RESULT_ARRAYS["prompt_top_token_ids"])
    prompt_top_logprobs: np.ndarray = _empty(RESULT_ARRAYS["prompt_top_logprobs"])

    @property
    def num_top_logprobs(self) -> int:
        return len(self.top_token_ids) // len(self.logprob_rows) if len(self.logprob_rows) else 0

    @property
    def num_top_prompt_logprobs(self) -> int:
        return len(self.prompt_top_token_ids) // len(self.prompt_logprobs) if len(self.prompt_logprobs) else 0

    def check(self) -> None:
        """Raises ValueError when the arrays are inconsistent with each other."""
        if len(self.slots) != len(self.token_ids):
            raise ValueError(f"result {self.step_id}: {len(self.slots)} slots but {len(self.token_ids)} token ids")
        for rows, (value, rank, top_ids, top_lp) in (
                (len(self.logprob_rows), ("logprobs", "logprob_ranks", "top_token_ids", "top_logprobs")),
                (len(self.prompt_logprobs), ("prompt_logprobs", "prompt_logprob_ranks", "prompt_top_token_ids",
                                             "prompt_top_logprobs"))):
            sizes = [len(getattr(self, n)) for n in (value, rank)]
            n_top = len(getattr(self, top_ids))
            if sizes != [rows, rows] or n_top != len(getattr(self, top_lp)) or (n_top % rows if rows else n_top):
                raise ValueError(f"result {self.step_id}: {value}, {rank}, {top_ids} and {top_lp} do not line up")
        if len(self.logprob_rows) and (self.logprob_rows.min() < 0 or self.logprob_rows.max() >= len(self.slots)):
            raise ValueError(f"result {self.step_id}: logprob_rows out of range")


def _pack(arr: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def _unpack(buf: bytes, dtype: np.dtype, name: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise ValueError(f"field {name}: {len(buf)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(buf, dtype=dtype)


def encode_plan(plan: StepPlan, pb_cls):
    return pb_cls(step_id=plan.step_id, **{n: _pack(getattr(plan, n), d) for n, d in PLAN_ARRAYS.items()})


def decode_plan(pb) -> StepPlan:
    plan = StepPlan(step_id=pb.step_id, **{n: _unpack(getattr(pb, n), d, n) for n, d in PLAN_ARRAYS.items()})
    plan.check()
    return plan


def encode_result(result: StepResult, pb_cls):
    return pb_cls(step_id=result.step_id, **{n: _pack(getattr(result, n), d) for n, d in RESULT_ARRAYS.items()})


def decode_result(pb) -> StepResult:
    result = StepResult(step_id=pb.step_id, **{n: _unpack(getattr(pb, n), d, n) for n, d in RESULT_ARRAYS.items()})
    result.check()
    return result


assert {f.name for f in fields(StepPlan)} == {"step_id", *PLAN_ARRAYS}
assert {f.name for f in fields(StepResult)} == {"step_id", *RESULT_ARRAYS}
