"""Rank 0 hands each step's message to the other tensor-parallel ranks through shared memory.

One `multiprocessing.shared_memory` segment: a header of int64 words, then the payload.
  word 0: sequence number of the message now in the payload (bumped after the payload is written)
  word 1: its kind (EXECUTE, RESET, STOP)
  word 2: its payload bytes
  word 3 + r: the last sequence number reader r has copied out
The writer waits until every reader has copied the previous message out (almost always
already so: a reader copies it within microseconds of waking), writes the next one and
releases each reader's semaphore, a futex on which an idle reader sleeps without
spinning. Semaphores and the segment's name reach the readers once, at spawn; per step
nothing is pickled: an EXECUTE payload is the plan's packed little-endian arrays
(proto/step.py's PLAN_ARRAYS), plus the ids rank 0 sampled the step before, which the
other ranks feed to their next decode step as rank 0 does.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from proto.step import PLAN_ARRAYS, StepPlan

EXECUTE, RESET, STOP = 1, 2, 3
_HEADER_WORDS = 3
_SAMPLED_ARRAYS = {"sampled_slots": np.dtype("<i4"), "sampled_token_ids": np.dtype("<i4")}
_ARRAYS = {**_SAMPLED_ARRAYS, **PLAN_ARRAYS}


class BroadcastError(RuntimeError):
    """A reader stopped taking messages (its process died) or a message does not fit the segment."""


@dataclass(slots=True)
class StepMessage:
    kind: int
    plan: StepPlan | None = None
    sampled_slots: np.ndarray | None = None  # what rank 0 sampled the step before this plan
    sampled_token_ids: np.ndarray | None = None


def encode_execute(plan: StepPlan, sampled_slots: np.ndarray, sampled_token_ids: np.ndarray) -> list[bytes]:
    """-> [step id and array lengths, then each array's bytes] in _ARRAYS order."""
    values = {"sampled_slots": sampled_slots, "sampled_token_ids": sampled_token_ids}
    arrays = [np.ascontiguousarray(values[n] if n in values else getattr(plan, n), dtype=d).tobytes()
              for n, d in _ARRAYS.items()]
    lengths = np.array([plan.step_id, *map(len, arrays)], dtype="<i8").tobytes()
    return [lengths, *arrays]


def decode_execute(payload: bytes) -> StepMessage:
    head = np.frombuffer(payload, dtype="<i8", count=1 + len(_ARRAYS))
    offset, arrays = head.nbytes, {}
    for (name, dtype), nbytes in zip(_ARRAYS.items(), head[1:].tolist()):
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        offset += nbytes
    slots, ids = arrays.pop("sampled_slots"), arrays.pop("sampled_token_ids")
    return StepMessage(EXECUTE, StepPlan(step_id=int(head[0]), **arrays), slots, ids)


class PlanBroadcast:
    """Rank 0's end: create(num_readers, capacity_bytes, semaphores); readers attach by name."""

    def __init__(self, num_readers: int, capacity_bytes: int, semaphores: list):
        self.num_readers = num_readers
        self.header_bytes = 8 * (_HEADER_WORDS + num_readers)
        self.capacity_bytes = capacity_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=self.header_bytes + capacity_bytes)
        self.header = np.ndarray(_HEADER_WORDS + num_readers, dtype=np.int64, buffer=self.shm.buf)
        self.header[:] = 0
        self.semaphores = semaphores
        self.seq = 0

    @property
    def name(self) -> str:
        return self.shm.name

    def publish(self, kind: int, parts: list[bytes], readers_alive: Callable[[], bool],
                timeout_s: float = 600.0) -> None:
        size = sum(map(len, parts))
        if size > self.capacity_bytes:
            raise BroadcastError(f"a step message of {size} bytes exceeds the {self.capacity_bytes} bytes of the "
                                 "shared segment (--max-message-bytes)")
        self._wait_for_readers(readers_alive, timeout_s)
        offset = self.header_bytes
        for part in parts:
            self.shm.buf[offset:offset + len(part)] = part
            offset += len(part)
        self.header[1], self.header[2] = kind, size
        self.seq += 1
        self.header[0] = self.seq  # last: a reader woken below sees a whole message
        for semaphore in self.semaphores:
            semaphore.release()

    def _wait_for_readers(self, readers_alive: Callable[[], bool], timeout_s: float) -> None:
        acks = self.header[_HEADER_WORDS:]
        deadline = time.monotonic() + timeout_s
        spins = 0
        while np.any(acks < self.seq):
            spins += 1
            if spins % 1024 == 0 and (not readers_alive() or time.monotonic() > deadline):
                raise BroadcastError("a tensor-parallel rank stopped taking step messages")
            time.sleep(0 if spins < 4096 else 1e-4)

    def close(self) -> None:
        self.header = None  # the numpy view must go before the segment can close
        self.shm.close()
        self.shm.unlink()


class PlanReceiver:
    """Reader r's end (a rank > 0): receive() sleeps until rank 0 publishes, then copies the message out."""

    def __init__(self, name: str, num_readers: int, reader_index: int, semaphore):
        # spawned readers share rank 0's resource tracker, so attaching registers nothing new to clean up
        self.shm = shared_memory.SharedMemory(name=name, **({"track": False} if sys.version_info >= (3, 13) else {}))
        self.header_bytes = 8 * (_HEADER_WORDS + num_readers)
        self.header = np.ndarray(_HEADER_WORDS + num_readers, dtype=np.int64, buffer=self.shm.buf)
        self.ack_word = _HEADER_WORDS + reader_index
        self.semaphore = semaphore

    def receive(self, timeout_s: float | None = None) -> StepMessage | None:
        """The next message; None when timeout_s passes without one."""
        if not self.semaphore.acquire(timeout=timeout_s):
            return None
        seq, kind, size = (int(v) for v in self.header[:_HEADER_WORDS])
        payload = bytes(self.shm.buf[self.header_bytes:self.header_bytes + size])
        self.header[self.ack_word] = seq  # rank 0 may now overwrite the segment
        return decode_execute(payload) if kind == EXECUTE else StepMessage(kind)

    def close(self) -> None:
        self.header = None
        self.shm.close()
