"""Noticing a frozen data plane on every transport: a watchdog over the steps in flight.

A data plane that is stopped (SIGSTOP), swapped out or on a hung host keeps its sockets
open: a shared-memory session never sees EOF, and a gRPC stream waits for keepalive, which
gives up late or never while the kernel still acknowledges TCP. So while a step is
outstanding, this thread watches for a sign of life: a step result, or an answer to a
health probe on the data plane's gRPC channel (served by threads other than the step
loop, so a long step does not count as frozen). With none for `timeout_s`
(--dataplane-liveness-timeout-s), it aborts the step stream; the receive that waits raises
DataPlaneUnavailable and the engine's recovery (controlplane/link/reconnect.py) takes over.
An idle engine sends no probes. The probe interval is timeout_s / 10, so the loss is
declared between timeout_s and timeout_s + 2 intervals after the last sign of life.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

log = structlog.get_logger("controlplane.link.liveness")

PROBE_FRACTION = 0.1


class LivenessWatch:
    def __init__(self, probe: Callable[[float], bool], timeout_s: float, describe_target: str):
        """probe(timeout_s) -> True when the data plane answered within timeout_s."""
        self.timeout_s = timeout_s
        self.interval_s = timeout_s * PROBE_FRACTION
        self._probe = probe
        self._target = describe_target
        self._cond = threading.Condition()
        self._alive_at: float | None = None  # last sign of life while a step is outstanding; None = nothing awaited
        self._stream = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.num_declared_lost = 0

    def awaiting(self, stream) -> None:
        """A step was sent on `stream` (it has abort(reason))."""
        with self._cond:
            if self._alive_at is None or stream is not self._stream:
                self._alive_at = time.monotonic()
                self._stream = stream
                self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dataplane-liveness", daemon=True)
            self._thread.start()

    def answered(self, still_awaiting: bool) -> None:
        with self._cond:
            self._alive_at = time.monotonic() if still_awaiting else None

    def stop_watching(self) -> None:
        with self._cond:
            self._alive_at, self._stream = None, None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._alive_at is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._cond.wait(self.interval_s)
                alive_at, stream = self._alive_at, self._stream
            if alive_at is None or time.monotonic() - alive_at < self.interval_s:
                continue
            probed_at = time.monotonic()
            if self._probe(self.interval_s):
                with self._cond:
                    if self._alive_at is not None and self._stream is stream:
                        self._alive_at = max(self._alive_at, probed_at)
                continue
            silent_s = time.monotonic() - alive_at
            if silent_s < self.timeout_s:
                continue
            with self._cond:
                if self._stream is not stream or self._alive_at != alive_at:
                    continue  # answered meanwhile, or a new stream
                self._alive_at, self._stream = None, None
            reason = (f"the data plane at {self._target} answered neither a step nor a health probe for "
                      f"{silent_s:.1f} s (--dataplane-liveness-timeout-s {self.timeout_s:g}): it is frozen, "
                      f"stopped or its host hangs")
            log.error("data plane lost: no sign of life", dataplane=self._target, silent_s=round(silent_s, 2),
                      timeout_s=self.timeout_s)
            self.num_declared_lost += 1
            stream.abort(reason)
