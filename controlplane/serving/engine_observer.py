"""What the Engine tells the rest of the control plane as it works: the hooks metrics, logs and health hang on.

Every method is called on the engine thread, between steps or right after one; an
observer must be quick and must not touch the scheduler's state, only read it. This
base class ignores everything; telemetry.EngineTelemetry is the real one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controlplane.serving.engine import RequestOutput
    from controlplane.core.sequence import Sequence
    from proto.step import StepPlan


class EngineObserver:
    def request_added(self, request_id: str, num_samples: int) -> None:
        """A request of num_samples sequences (its n) entered the engine; they wait for slots."""

    def request_adopted(self, request_id: str, num_unfinished: int) -> None:
        """A request moved here from another data plane's engine (it left); its samples are re-prefilled."""

    def step_done(self, plan: "StepPlan", duration_s: float, seq_at_slot: "list[Sequence | None]") -> None:
        """The data plane ran plan (duration_s: from sending it to its result); called before its
        sampled tokens are appended. seq_at_slot: who sat at each slot in that plan (with
        overlap, a later plan may have given a slot to another sequence already)."""

    def output_sent(self, output: "RequestOutput") -> None:
        """A delta of one sample went to its request's stream; the sample's last one has finish_reason and usage."""

    def request_dropped(self, request_id: str, reason: str) -> None:
        """A request ended without a last output: "abort" (its caller went away) or "error"."""

    def dataplane_lost(self, message: str) -> None:
        """The step stream to the data plane broke; the requests in flight wait for a reconnect."""

    def dataplane_reconnected(self) -> None:
        """A compatible data plane answered and a new step stream is open; held requests are recomputed."""
