"""How the control plane's steps reach the data plane: the StepStream protocol and the choice of transport.

Two StepStreams carry the same plans and results: controlplane/link/transport_grpc.py (the
DataPlane/Step stream, any host) and controlplane/link/transport_shm.py (a shared-memory
session, same host). `choose_transport` picks one from --transport and what the data
plane advertises in Describe; DataPlaneClient (controlplane/link/dataplane_client.py) opens it.
"""
from __future__ import annotations

from typing import Protocol

from proto.shm_channel import host_identity
from proto.step import StepPlan, StepResult

TRANSPORTS = ("auto", "shm", "grpc")


class DataPlaneUnavailable(RuntimeError):
    """The data plane cannot be reached or its step stream broke."""


class DataPlaneRefused(DataPlaneUnavailable):
    """The data plane answered and refused this control plane's credential (UNAUTHENTICATED)."""


class DataPlaneFenced(DataPlaneUnavailable):
    """A newer control plane took the data plane's step session (proto/dataplane_access.py): stop driving it."""


class StepStream(Protocol):
    name: str

    @property
    def broken(self) -> bool:
        """The stream ended (the data plane went away) and can carry no more plans."""

    def send(self, plan: StepPlan) -> None: ...

    def receive(self) -> StepResult:
        """The next result in plan order; raises DataPlaneUnavailable when the stream or the peer is gone,
        DataPlaneFenced when a newer control plane took the session."""

    def fence_message(self) -> str:
        """Of a stream that is broken: the data plane's message when a newer control plane fenced it, else ""."""

    def abort(self, reason: str) -> None:
        """From another thread (controlplane/link/liveness.py): a receive() that waits raises
        DataPlaneUnavailable(reason) soon."""

    def close(self) -> None: ...


def choose_transport(mode: str, info, target: str) -> tuple[str, str]:
    """-> ("shm" | "grpc", why). mode "shm" raises DataPlaneUnavailable, saying what to fix, when it cannot be."""
    if mode == "grpc":
        return "grpc", "--transport grpc"
    if not info.shm_socket:
        why = f"the data plane at {target} offers no shared-memory sessions (--shm-socket off, or an older version)"
    elif not info.host_id or info.host_id != host_identity():
        why = (f"the data plane at {target} runs on another host or in other IPC or network namespaces "
               f"(its host id {info.host_id or '?'!r}, ours {host_identity() or '?'!r})")
    else:
        return "shm", "the data plane is on this host, in this IPC namespace"
    if mode == "shm":
        raise DataPlaneUnavailable(f"--transport shm: {why}; use --transport auto or grpc")
    return "grpc", why
