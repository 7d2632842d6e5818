"""Step plans and results as raw frames, for the shared-memory transport (no protobuf, no pickle).

A frame is a header of little-endian int64 words, then the arrays' bytes back to back:
  word 0: FRAME_MAGIC | kind (PLAN, RESULT or ERROR)
  word 1: step id
  words 2..: the byte length of each array, in proto/step.py's PLAN_ARRAYS or RESULT_ARRAYS
             order (an ERROR frame has one length: its UTF-8 message)
The arrays keep the dtypes of those tables, so a frame carries exactly what the gRPC
messages carry. `encode_*` returns the frame as parts (buffers of the arrays themselves,
no copy) for the channel to write; `decode_frame` checks the plan or result as
proto/step.py's protobuf decoders do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proto.step import PLAN_ARRAYS, RESULT_ARRAYS, StepPlan, StepResult

PLAN, RESULT, ERROR = 1, 2, 3
FRAME_MAGIC = 0x4E50_5346 << 8  # "NPSF"
_TABLES = {PLAN: (StepPlan, PLAN_ARRAYS), RESULT: (StepResult, RESULT_ARRAYS),
           ERROR: (None, {"message": np.dtype("u1")})}
_WORD = np.dtype("<i8")
# most arrays of a step are empty: shared, read-only (as np.frombuffer's views of a bytes frame are)
_EMPTY = {d: np.frombuffer(b"", d) for _, table in _TABLES.values() for d in table.values()}


@dataclass(slots=True)
class ErrorFrame:
    """The data plane ended the session: it rejected plan step_id (or failed), for this reason."""

    step_id: int
    message: str


def _parts(kind: int, step_id: int, arrays: list[np.ndarray]) -> list[memoryview]:
    head = np.array([FRAME_MAGIC | kind, step_id, *(a.nbytes for a in arrays)], dtype=_WORD)
    return [memoryview(head).cast("B"), *(memoryview(a).cast("B") for a in arrays if a.nbytes)]


def _encode(kind: int, value) -> list[memoryview]:
    _, table = _TABLES[kind]
    return _parts(kind, value.step_id, [np.ascontiguousarray(getattr(value, n), dtype=d) for n, d in table.items()])


def encode_plan(plan: StepPlan) -> list[memoryview]:
    return _encode(PLAN, plan)


def encode_result(result: StepResult) -> list[memoryview]:
    return _encode(RESULT, result)


def encode_error(step_id: int, message: str) -> list[memoryview]:
    return _parts(ERROR, step_id, [np.frombuffer(message.encode(), dtype="u1")])


def frame_bytes(parts: list[memoryview]) -> int:
    return sum(p.nbytes for p in parts)


def peek_step_id(frame: bytes) -> int:
    """The step id of a frame that may not decode (for the error that rejects it); -1 if it has none."""
    return int(np.frombuffer(frame, _WORD, 1, 8)[0]) if len(frame) >= 16 else -1


def decode_frame(frame: bytes) -> StepPlan | StepResult | ErrorFrame:
    """Raises ValueError naming what is wrong with a frame that is not a consistent plan, result or error."""
    if len(frame) < 16:
        raise ValueError(f"a step frame needs at least 16 bytes, got {len(frame)}")
    magic_kind, step_id = (int(w) for w in np.frombuffer(frame, _WORD, 2))
    kind = magic_kind & 0xFF
    if magic_kind & ~0xFF != FRAME_MAGIC or kind not in _TABLES:
        raise ValueError(f"not a step frame (first word {magic_kind:#x}): the two planes run different versions?")
    cls, table = _TABLES[kind]
    header_bytes = _WORD.itemsize * (2 + len(table))
    if len(frame) < header_bytes:
        raise ValueError(f"step frame {step_id}: {len(frame)} bytes cannot hold its {header_bytes}-byte header")
    lengths = np.frombuffer(frame, _WORD, len(table), 16).tolist()
    if any(n < 0 for n in lengths) or header_bytes + sum(lengths) != len(frame):
        raise ValueError(f"step frame {step_id}: array lengths add up to {sum(lengths)} bytes, "
                         f"the frame holds {len(frame) - header_bytes}")
    offset, arrays = header_bytes, {}
    for (name, dtype), nbytes in zip(table.items(), lengths):
        if nbytes % dtype.itemsize:
            raise ValueError(f"field {name}: {nbytes} bytes is not a whole number of {dtype} values")
        arrays[name] = np.frombuffer(frame, dtype, nbytes // dtype.itemsize, offset) if nbytes else _EMPTY[dtype]
        offset += nbytes
    if cls is None:
        return ErrorFrame(step_id, arrays["message"].tobytes().decode(errors="replace"))
    value = cls(step_id=step_id, **arrays)
    value.check()
    return value
