"""Each batch slot's sampling parameters, held on the host, and one step's SamplingInputs.

`SlotSamplingParams.admit(plan)` stores the params of the plan's new sequences at
their slots; `gather(slots, positions)` builds the per-row tensors of the rows that
sample this step, and decides on the host (no device sync) which rows need more than
the plain Sampler: penalties, min_tokens bans, logprobs. BatchState owns one of these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proto.sampling_schema import COLUMNS, DATAPLANE_OPTIONS
from proto.step import StepPlan


@dataclass(slots=True)
class SamplingInputs:
    """Per sampled row, on the device unless noted."""

    # the Sampler's per-row params by its keyword names (its options' columns: proto/sampling_schema.py)
    sampler_args: dict[str, torch.Tensor]
    positions: torch.Tensor  # i64: index in its sequence of the token being sampled
    # rows with a penalty (host), their slots, and PenaltyState.apply's per-row penalties by name
    penalty_rows: np.ndarray
    penalty_slots: torch.Tensor  # i64
    penalty_args: dict[str, torch.Tensor]  # empty when no row has a penalty
    # min_tokens: (row, token id) pairs to ban
    ban_rows: torch.Tensor  # i64
    ban_token_ids: torch.Tensor  # i64
    # rows that return logprobs (host), and the most top logprobs any of them asked for
    logprob_rows: np.ndarray
    num_top_logprobs: int


def _host_dtype(wire: str) -> np.dtype:
    return np.dtype(bool) if wire == "u1" else np.dtype(wire).newbyteorder("=")


_NO_ROWS = np.zeros(0, dtype=np.int64)
_TORCH_DTYPE = {"f": torch.float32, "i": torch.long, "b": torch.bool}  # by numpy kind
SAMPLER_COLUMNS = tuple(c.slot for o in DATAPLANE_OPTIONS if o.reads == "sampler" for c in o.columns)
PENALTY_COLUMNS = tuple(c.slot for o in DATAPLANE_OPTIONS if o.reads == "penalties" for c in o.columns)


class PackedColumns:
    """Named 1-D columns of one length, stacked by dtype on the host: one staged array per dtype, not
    one per column. `set` overwrites a column in place, so a packing can be kept and reused."""

    __slots__ = ("_groups", "_where")

    def __init__(self, columns: dict[str, np.ndarray]):
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, values in columns.items():
            by_dtype.setdefault(_TORCH_DTYPE[values.dtype.kind], []).append(name)
        self._groups = [(dtype, names, np.stack([columns[n] for n in names])) for dtype, names in by_dtype.items()]
        self._where = {name: (stacked, i) for _, names, stacked in self._groups for i, name in enumerate(names)}

    def set(self, name: str, values: np.ndarray) -> None:
        stacked, row = self._where[name]
        stacked[row] = values

    def upload(self, as_tensor) -> dict[str, torch.Tensor]:
        out = {}
        for dtype, names, stacked in self._groups:
            tensor = as_tensor(stacked, dtype)
            out |= {name: tensor[i] for i, name in enumerate(names)}
        return out


def upload_columns(columns: dict[str, np.ndarray], as_tensor) -> dict[str, torch.Tensor]:
    """The arrays as device tensors: one host-to-device copy per dtype, not one per array."""
    return PackedColumns(columns).upload(as_tensor)


@dataclass(slots=True)
class SlotSelection:
    """What gathering the rows that sample at `slots` takes from the slots' params alone (host arrays),
    so that a batch whose slots and params did not change since the last step reuses it."""

    slots: np.ndarray
    sampler_columns: PackedColumns  # SAMPLER_COLUMNS and a "positions" row that each step overwrites
    penalty_rows: np.ndarray
    penalty_slots: np.ndarray
    penalty_columns: PackedColumns
    logprob_rows: np.ndarray
    num_top_logprobs: int
    # min_tokens: the rows with stop ids to ban, those ids (padded with -1), and when the bans end
    stop_rows: np.ndarray
    stop_ids: np.ndarray
    ban_until_position: np.ndarray  # a row bans while the position it samples is below this

    def gather(self, positions: np.ndarray, as_tensor) -> SamplingInputs:
        """The step's SamplingInputs for the tokens sampled at `positions` (one per row)."""
        self.sampler_columns.set("positions", positions)
        sampler_args = self.sampler_columns.upload(as_tensor)
        ban_rows = ban_token_ids = _NO_ROWS
        if len(self.stop_rows):
            # min_tokens: rows that have produced fewer outputs than that ban their stop ids
            banning = np.flatnonzero(positions[self.stop_rows] < self.ban_until_position)
            ids = self.stop_ids[banning]
            ban_row, ban_column = np.nonzero(ids >= 0)
            ban_rows, ban_token_ids = self.stop_rows[banning][ban_row], ids[ban_row, ban_column]
        return SamplingInputs(
            sampler_args=sampler_args,
            positions=sampler_args.pop("positions"),  # it goes up with the integer params
            penalty_rows=self.penalty_rows,
            penalty_slots=as_tensor(self.penalty_slots, torch.long),
            penalty_args=self.penalty_columns.upload(as_tensor) if len(self.penalty_rows) else {},
            ban_rows=as_tensor(ban_rows, torch.long),
            ban_token_ids=as_tensor(ban_token_ids, torch.long),
            logprob_rows=self.logprob_rows,
            num_top_logprobs=self.num_top_logprobs,
        )


class SlotSamplingParams:
    """One array per step-plan sampling column (proto/sampling_schema.py's COLUMNS, named as the
    column without "new_": temperature, seed, has_seed, num_logprobs, ...), indexed by slot."""

    def __init__(self, max_num_seqs: int, device: torch.device):
        self.device = device
        n = max_num_seqs
        for option in DATAPLANE_OPTIONS:
            for column in option.columns:
                setattr(self, column.slot, np.full(n, column.pack(option.default), dtype=_host_dtype(column.dtype)))
        self.uses_penalties = np.zeros(n, dtype=bool)
        self.num_prompt_tokens = np.zeros(n, dtype=np.int64)
        # banned ids until min_tokens, one row per slot, padded with -1; widened on demand
        self.stop_ids = np.full((n, 0), -1, dtype=np.int64)
        self._selection: SlotSelection | None = None  # selection's last answer, until an admit changes params

    def admit(self, plan: StepPlan) -> None:
        new = plan.new_slots
        if len(new) == 0:
            return
        self._selection = None
        for column in COLUMNS:
            getattr(self, column.slot)[new] = getattr(plan, column.field)
        self.uses_penalties[new] = plan.new_uses_penalties
        self.num_prompt_tokens[new] = plan.new_num_prompt_tokens
        self._admit_stop_ids(new, plan.new_num_stop_ids.astype(np.int64), plan.stop_ids)

    def _admit_stop_ids(self, new: np.ndarray, counts: np.ndarray, stop_ids: np.ndarray) -> None:
        width = int(counts.max())
        if width > self.stop_ids.shape[1]:
            wider = np.full((len(self.stop_ids), max(width, 2 * self.stop_ids.shape[1])), -1, dtype=np.int64)
            wider[:, :self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[new] = -1
        owner = np.repeat(np.arange(len(new)), counts)
        column = np.arange(len(stop_ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.stop_ids[new[owner], column] = stop_ids

    def selection(self, slots: np.ndarray) -> SlotSelection:
        """select(slots), or its last answer again when neither the slots nor any slot's params (admit)
        changed since."""
        last = self._selection
        if last is None or not np.array_equal(last.slots, slots):
            self._selection = self.select(np.array(slots))  # a copy: the caller's array may change
        return self._selection

    def select(self, slots: np.ndarray) -> SlotSelection:
        """What the rows sampling at `slots` take from their params."""
        penalty_rows = np.flatnonzero(self.uses_penalties[slots])
        penalty_slots = slots[penalty_rows]
        stop_rows = np.flatnonzero(np.any(self.stop_ids[slots] >= 0, axis=1))
        stop_slots = slots[stop_rows]
        logprob_rows = np.flatnonzero(self.num_logprobs[slots] >= 0)
        penalty_rows.flags.writeable = logprob_rows.flags.writeable = False  # every step's SamplingInputs has them
        return SlotSelection(
            slots=slots,
            sampler_columns=PackedColumns({name: getattr(self, name)[slots] for name in SAMPLER_COLUMNS}
                                          | {"positions": np.zeros(len(slots), dtype=np.int64)}),
            penalty_rows=penalty_rows,
            penalty_slots=penalty_slots,
            penalty_columns=PackedColumns({name: getattr(self, name)[penalty_slots] for name in PENALTY_COLUMNS}),
            logprob_rows=logprob_rows,
            num_top_logprobs=int(self.num_logprobs[slots[logprob_rows]].max()) if len(logprob_rows) else 0,
            stop_rows=stop_rows,
            stop_ids=self.stop_ids[stop_slots],
            ban_until_position=self.num_prompt_tokens[stop_slots] + self.min_tokens[stop_slots],
        )

    def gather(self, slots: np.ndarray, positions: np.ndarray, as_tensor=None) -> SamplingInputs:
        """The inputs of rows sampling at `slots`, the token being sampled at `positions`.
        as_tensor(array, dtype) may be a packed upload whose data lands later: launch no device op here."""
        device = self.device
        as_tensor = as_tensor or (lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt))
        return self.selection(slots).gather(positions, as_tensor)
