"""Getting the data plane back after its Step stream broke: backoff, a compatibility check, and when to give up.

The Engine holds every request when the stream breaks (the scheduler re-queues them
for recompute) and asks `DataPlaneReconnector` from its loop whether an attempt is due.
An attempt is one Describe call: a data plane that answers must be the one the requests
were validated against (same model, vocabulary and block size; at least the model length
and KV blocks that were promised) before a new Step stream is opened to it. Attempts back
off exponentially up to `max_backoff_s`. The requests wait up to `timeout_s` of outage
(`--dataplane-reconnect-timeout-s`); past it, or after a data plane that answers Describe
broke the stream `max_breaks_without_progress` times without one step succeeding (a plan
that crashes it each time), the Engine fails what it holds with UNAVAILABLE and refuses
new requests at once until the data plane is back. A control plane that a newer one fenced
(DataPlaneClient.fenced) gives up at once and never reconnects: two control planes would
otherwise take the data plane from each other in turn.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from controlplane.link.dataplane_client import DataPlaneClient, DataPlaneUnavailable

log = structlog.get_logger("controlplane.link.reconnect")


@dataclass(slots=True, frozen=True)
class Backoff:
    initial_s: float = 0.05
    max_s: float = 2.0

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt `attempt` (0 = the first, at once)."""
        return 0.0 if attempt == 0 else min(self.max_s, self.initial_s * 2 ** (attempt - 1))


def incompatibilities(promised, offered) -> list[str]:
    """Why `offered` (a DataPlaneInfo) cannot take over the requests validated against `promised`; [] if it can.

    Slots and the per-step token budget may differ (the scheduler adopts them); more KV
    blocks are welcome; fewer would break the promise that each request fits alone."""
    problems = []
    for name in ("model_name", "architecture", "vocab_size", "block_size"):
        if getattr(offered, name) != getattr(promised, name):
            problems.append(f"{name} is {getattr(offered, name)!r}, was {getattr(promised, name)!r}")
    if sorted(offered.eos_token_ids) != sorted(promised.eos_token_ids):
        problems.append(f"eos_token_ids are {list(offered.eos_token_ids)}, were {list(promised.eos_token_ids)}")
    for name in ("max_model_len", "num_kv_blocks"):
        if getattr(offered, name) < getattr(promised, name):
            problems.append(f"{name} is {getattr(offered, name)}, fewer than the {getattr(promised, name)} "
                            f"requests were validated against")
    return problems


class DataPlaneReconnector:
    def __init__(self, dataplane: DataPlaneClient, promised, timeout_s: float, backoff: Backoff = Backoff(),
                 attempt_timeout_s: float = 2.0, max_breaks_without_progress: int = 3):
        self.dataplane = dataplane
        self.promised = promised  # the DataPlaneInfo the control plane was built on
        self.timeout_s = timeout_s
        self.backoff = backoff
        self.attempt_timeout_s = attempt_timeout_s
        self.max_breaks_without_progress = max_breaks_without_progress
        self.connected = True
        self.failing_fast = False  # gave up on this outage: new requests fail at once until reconnected
        self.reason = ""
        self.num_reconnects = 0
        self._outage_since: float | None = None  # cleared by a step that succeeds
        self._breaks_without_progress = 0
        self._attempt = 0
        self._next_attempt_s = 0.0
        self._last_refusal = ""

    # --- reported by the Engine ------------------------------------------------------
    def lost(self, reason: str) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        else:
            self._breaks_without_progress += 1  # reconnected, then broke again before any step succeeded
        self.connected = False
        self.reason = reason
        self._attempt = 0
        self._next_attempt_s = now

    def progressed(self) -> None:
        """A step succeeded (or the engine is idle after a reconnect): the outage is over."""
        self._outage_since = None
        self._breaks_without_progress = 0

    def gave_up(self) -> None:
        """The Engine failed what it held; refuse new requests until the data plane is back."""
        self.failing_fast = True
        self._outage_since = time.monotonic()
        self._breaks_without_progress = 0

    # --- asked by the Engine -------------------------------------------------------
    def should_give_up(self) -> bool:
        if self.connected or self._outage_since is None or self.failing_fast:
            return False
        return (time.monotonic() - self._outage_since > self.timeout_s
                or self._breaks_without_progress >= self.max_breaks_without_progress)

    def give_up_message(self) -> str:
        if self.dataplane.fenced:
            return self.unavailable_message()
        if self._breaks_without_progress >= self.max_breaks_without_progress:
            return (f"the data plane at {self.dataplane.target} broke the step stream "
                    f"{self._breaks_without_progress + 1} times in a row without completing a step "
                    f"(last: {self.reason}); the requests it held were dropped, retry")
        return self.unavailable_message()

    def unavailable_message(self) -> str:
        if self.dataplane.fenced:
            return (f"this control plane no longer drives the data plane at {self.dataplane.target}: "
                    f"{self.dataplane.fenced.removeprefix('fenced: ')}")
        return (f"the data plane at {self.dataplane.target} has been unavailable for longer than "
                f"--dataplane-reconnect-timeout-s ({self.timeout_s:g} s): {self.reason}; retry later")

    def seconds_to_next_attempt(self) -> float:
        return max(0.0, self._next_attempt_s - time.monotonic())

    def attempt(self):
        """One reconnect attempt if one is due; the new data plane's DataPlaneInfo once a stream is open, else None."""
        if self.connected or self.seconds_to_next_attempt() > 0 or self.dataplane.fenced:
            return None
        self._attempt += 1
        self._next_attempt_s = time.monotonic() + self.backoff.delay_s(self._attempt)
        try:
            info = self.dataplane.describe_once(self.attempt_timeout_s)
        except DataPlaneUnavailable as e:
            self.reason = f"data plane does not answer: {e}"
            return None
        problems = incompatibilities(self.promised, info)
        if problems:
            refusal = "; ".join(problems)
            self.reason = f"the data plane that answers is not compatible: {refusal}"
            if refusal != self._last_refusal:  # once per kind of refusal, not every attempt
                log.error("refusing an incompatible data plane: restart the control plane to use it",
                          dataplane=self.dataplane.target, problems=problems)
                self._last_refusal = refusal
            return None
        self.dataplane.open_stream()
        self.connected = True
        self.failing_fast = False
        self.num_reconnects += 1
        self._last_refusal = ""
        log.info("reconnected to data plane", dataplane=self.dataplane.target, attempts=self._attempt,
                 num_kv_blocks=info.num_kv_blocks, max_num_seqs=info.max_num_seqs)
        return info
