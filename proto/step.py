"""The step protocol as plain data: what the control plane asks of the data plane each step.

Both planes speak in these dataclasses; `encode_*`/`decode_*` are the only place
they meet protobuf. Every array is a 1-D numpy array of the dtype named in
PLAN_ARRAYS / RESULT_ARRAYS, and travels as packed little-endian bytes.

A plan carries only what changed (DESIGN.md, "The step protocol"):
- `drop_slots`: sequences leaving the batch (finished, aborted, preempted);
- `new_*`: sequences entering the batch at a slot, with their sampling params and
  how many of their tokens already sit in the KV cache (prefix-cache hit);
- `block_*`: block-table writes, `block_tables[slot][index] = id`;
- `run_*`: the sequences that run this step, in batch order, each with its number
  of tokens and flags; `token_ids` holds the tokens of entries flagged
  RUN_TOKENS_IN_PLAN (prefill chunks). Other entries are decodes of the token the
  data plane sampled last for that slot, so a steady decode step sends no ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

# run_flags bits
RUN_SAMPLE = 1  # sample a token after this entry's last token
RUN_TOKENS_IN_PLAN = 2  # the entry's tokens are in plan.token_ids

PLAN_ARRAYS: dict[str, np.dtype] = {
    "drop_slots": np.dtype("<i4"),
    "new_slots": np.dtype("<i4"),
    "new_num_cached_tokens": np.dtype("<i4"),
    "new_temperature": np.dtype("<f4"),
    "new_top_p": np.dtype("<f4"),
    "new_top_k": np.dtype("<i4"),
    "new_seed": np.dtype("<i8"),
    "new_has_seed": np.dtype("u1"),
    "block_slots": np.dtype("<i4"),
    "block_indices": np.dtype("<i4"),
    "block_ids": np.dtype("<i4"),
    "run_slots": np.dtype("<i4"),
    "run_num_tokens": np.dtype("<i4"),
    "run_flags": np.dtype("u1"),
    "token_ids": np.dtype("<i4"),
}

RESULT_ARRAYS: dict[str, np.dtype] = {
    "slots": np.dtype("<i4"),
    "token_ids": np.dtype("<i4"),
}


def _empty(dtype: np.dtype):
    return field(default_factory=lambda: np.zeros(0, dtype))


@dataclass(slots=True)
class StepPlan:
    step_id: int
    drop_slots: np.ndarray = _empty(PLAN_ARRAYS["drop_slots"])
    new_slots: np.ndarray = _empty(PLAN_ARRAYS["new_slots"])
    new_num_cached_tokens: np.ndarray = _empty(PLAN_ARRAYS["new_num_cached_tokens"])
    new_temperature: np.ndarray = _empty(PLAN_ARRAYS["new_temperature"])
    new_top_p: np.ndarray = _empty(PLAN_ARRAYS["new_top_p"])
    new_top_k: np.ndarray = _empty(PLAN_ARRAYS["new_top_k"])
    new_seed: np.ndarray = _empty(PLAN_ARRAYS["new_seed"])
    new_has_seed: np.ndarray = _empty(PLAN_ARRAYS["new_has_seed"])
    block_slots: np.ndarray = _empty(PLAN_ARRAYS["block_slots"])
    block_indices: np.ndarray = _empty(PLAN_ARRAYS["block_indices"])
    block_ids: np.ndarray = _empty(PLAN_ARRAYS["block_ids"])
    run_slots: np.ndarray = _empty(PLAN_ARRAYS["run_slots"])
    run_num_tokens: np.ndarray = _empty(PLAN_ARRAYS["run_num_tokens"])
    run_flags: np.ndarray = _empty(PLAN_ARRAYS["run_flags"])
    token_ids: np.ndarray = _empty(PLAN_ARRAYS["token_ids"])

    @property
    def num_sampled(self) -> int:
        return int(np.count_nonzero(self.run_flags & RUN_SAMPLE))

    def check(self) -> None:
        """Raises ValueError when the arrays are inconsistent with each other."""
        n_new = len(self.new_slots)
        for name in ("new_num_cached_tokens", "new_temperature", "new_top_p", "new_top_k", "new_seed", "new_has_seed"):
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


@dataclass(slots=True)
class StepResult:
    step_id: int
    slots: np.ndarray = _empty(RESULT_ARRAYS["slots"])
    token_ids: np.ndarray = _empty(RESULT_ARRAYS["token_ids"])


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
    if len(result.slots) != len(result.token_ids):
        raise ValueError(f"result {result.step_id}: {len(result.slots)} slots but {len(result.token_ids)} token ids")
    return result


assert {f.name for f in fields(StepPlan)} == {"step_id", *PLAN_ARRAYS}
assert {f.name for f in fields(StepResult)} == {"step_id", *RESULT_ARRAYS}
