"""Admission control: bounds what the control plane holds, so overload is refused at once, never queued without end.

Two limits, checked by the API servicer after validation and before the Engine sees the
request: `--max-waiting-requests` (requests accepted but with no sample in a batch slot
yet) and `--max-pending-tokens` (prompt + max_tokens × n of every unfinished request:
the token memory and KV they may come to need). Past either, the call fails with
RESOURCE_EXHAUSTED and a retry hint: trailing metadata `retry-after-ms`, repeated in the
message. Everything here runs on the API's event loop thread; only the Engine's count of
running requests is read across threads (a plain int, at most a step stale).
"""
from __future__ import annotations

from typing import Callable

RETRY_AFTER_MS = 1000  # about the time a loaded server takes to finish a batch of short requests
RETRY_AFTER_METADATA = "retry-after-ms"


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_ms: int = RETRY_AFTER_MS):
        super().__init__(f"{message}; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class AdmissionControl:
    def __init__(self, max_waiting_requests: int, max_pending_tokens: int,
                 num_running_requests: Callable[[], int] = lambda: 0):
        self.max_waiting_requests = max_waiting_requests
        self.max_pending_tokens = max_pending_tokens
        self._num_running_requests = num_running_requests
        self.num_requests = 0  # admitted and not yet ended
        self.num_pending_tokens = 0
        self.num_rejected = 0

    @property
    def num_waiting(self) -> int:
        return max(0, self.num_requests - self._num_running_requests())

    def admit(self, num_tokens: int) -> None:
        """Counts the request in, or raises Overloaded; every admit is paired with a release(num_tokens)."""
        waiting = self.num_waiting
        if waiting >= self.max_waiting_requests:
            self.num_rejected += 1
            raise Overloaded(f"the server is overloaded: {waiting} requests wait for a batch slot, the most it "
                             f"queues (--max-waiting-requests)")
        # a request alone over the limit still gets in when nothing else is pending, or it never would
        if self.num_pending_tokens and self.num_pending_tokens + num_tokens > self.max_pending_tokens:
            self.num_rejected += 1
            raise Overloaded(f"the server is overloaded: its unfinished requests may need {self.num_pending_tokens} "
                             f"tokens and this one {num_tokens}, past the {self.max_pending_tokens} it takes "
                             f"(--max-pending-tokens)")
        self.num_requests += 1
        self.num_pending_tokens += num_tokens

    def release(self, num_tokens: int) -> None:
        self.num_requests -= 1
        self.num_pending_tokens -= num_tokens
