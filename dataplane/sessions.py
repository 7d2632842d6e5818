"""Who drives the data plane now: one step session at a time, numbered by epoch; a newer one fences the older.

Every session that reaches `open` has already proved the credential (dataplane/security.py
on gRPC, the session proof on shared memory), so the newest is the control plane that
should drive: a restarted one, or one that took over from a stale one that lost its
connection without the data plane noticing. `open` bumps the epoch, fences the session
that holds the data plane (its transport ends it with a FENCED message, and its control
plane stops driving rather than reconnecting), waits for it to let go, and hands over a
clean data plane: `runner.reset()` forgets every sequence and zeroes the KV cache, so no
plan of the new session can read KV that an earlier session wrote.
"""
from __future__ import annotations

import threading
from typing import Callable

import structlog

from proto.dataplane_access import FENCED

log = structlog.get_logger("dataplane.sessions")

SESSION_WAIT_S = 5.0  # how long a newer session waits for the one it fenced to drain its steps in flight
BUSY = "a newer control plane took the step session of this data plane while this one waited for it"


class SessionFenced(Exception):
    """Raised by a PlanSource whose session a newer one fenced; str() is the message for its control plane."""


class StepSessions:
    def __init__(self, runner):
        self.runner = runner
        self.epoch = 0
        self._held = threading.Lock()  # held by the session that drives the runner
        self._mutex = threading.Lock()
        self._fence: Callable[[str], None] | None = None  # ends the session that holds _held

    def open(self, fence: Callable[[str], None], transport: str) -> int | None:
        """The new session's epoch once it drives a clean data plane; None if an even newer one came meanwhile,
        or the old one did not let go within SESSION_WAIT_S. fence(message) must make the session end soon."""
        with self._mutex:
            self.epoch += 1
            epoch, old = self.epoch, self._fence
            self._fence = None
        if old is not None:
            log.warning("fencing the step session of an older control plane", new_epoch=epoch, transport=transport)
            old(f"{FENCED}a newer control plane opened step session {epoch} on this data plane; this one stops "
                f"driving it (restart it to take over again)")
        if not self._held.acquire(timeout=SESSION_WAIT_S):
            return None
        with self._mutex:
            if self.epoch != epoch:
                self._held.release()
                return None
            self._fence = fence
        self.runner.reset()
        log.info("step session opened", epoch=epoch, transport=transport)
        return epoch

    def close(self, epoch: int) -> None:
        with self._mutex:
            if self.epoch == epoch:
                self._fence = None
        self.runner.reset()  # drops what this session's KV held before anyone else can open one
        self._held.release()
