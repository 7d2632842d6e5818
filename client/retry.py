"""When the client library calls again after UNAVAILABLE: exponential backoff, within the call's deadline.

UNAVAILABLE means no server answered (not started yet, restarting, a network blip), the
server is shutting down, or its data plane stayed away past the reconnect timeout:
calling again later may work. Other codes are the caller's to handle. A generation that
already streamed tokens is not called again unless the caller asks (`retry_partial`):
the new attempt starts over, and its first delta says so (`GenerationDelta.restarted`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # calls after the first; 0 = never call again
    backoff_s: float = 0.2  # wait before the first retry, doubled for each next one (at most MAX_BACKOFF_S)
    retry_partial: bool = False  # call a generation again after it streamed tokens

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"retries and backoff_s must not be negative, got {self.retries} and {self.backoff_s}")

    def delay_s(self, attempt: int) -> float:
        """Wait after failed attempt `attempt` (0 = the first call)."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt)

    def next_delay_s(self, error: grpc.RpcError, attempt: int, produced: bool, deadline: float | None,
                     retry_partial: bool | None = None) -> float | None:
        """The wait before calling again after `error` ended attempt `attempt`; None = raise it instead."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        if produced and not (self.retry_partial if retry_partial is None else retry_partial):
            return None
        delay = self.delay_s(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def deadline_of(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def time_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
