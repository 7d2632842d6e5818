"""StepStream over a shared-memory session with a data plane on this host (proto/shm_channel.py)."""
from __future__ import annotations

from controlplane.link.transport import DataPlaneFenced, DataPlaneUnavailable
from proto import step_frames
from proto.dataplane_access import FENCED
from proto.shm_channel import MessageTooLarge, PeerGone, SessionRefused, open_session
from proto.step import StepPlan, StepResult


class ShmStepStream:
    name = "shm"

    def __init__(self, socket_path: str, proof: bytes, slot_bytes: int):
        """proof: proto.dataplane_access.session_proof of the data plane's token and ticket. Raises OSError when
        the data plane's socket cannot be reached, DataPlaneUnavailable when it refuses."""
        try:
            self.channel = open_session(socket_path, proof, slot_bytes)
        except SessionRefused as e:
            raise DataPlaneUnavailable(f"the data plane refused a shared-memory session: {e}") from e

    @property
    def broken(self) -> bool:
        return not self.channel.peer_alive()

    def send(self, plan: StepPlan) -> None:
        try:
            self.channel.send(step_frames.encode_plan(plan))
        except (PeerGone, MessageTooLarge) as e:
            raise DataPlaneUnavailable(f"shared-memory step session: {e}") from e

    def receive(self) -> StepResult:
        try:
            frame = self.channel.receive()
        except PeerGone as e:
            raise DataPlaneUnavailable(f"shared-memory step session ended: {e}") from e
        try:
            result = step_frames.decode_frame(frame)
        except ValueError as e:
            raise DataPlaneUnavailable(f"the data plane sent a bad result frame: {e}") from e
        if isinstance(result, step_frames.ErrorFrame):
            if result.message.startswith(FENCED):
                raise DataPlaneFenced(result.message)
            raise DataPlaneUnavailable(f"the data plane ended the step session: {result.message}")
        if not isinstance(result, StepResult):
            raise DataPlaneUnavailable(f"the data plane sent a {type(result).__name__} frame, not a result")
        return result

    def fence_message(self) -> str:
        """Why a session that ended was fenced (the data plane's last frame says so), else ""."""
        try:
            frame = self.channel.receive(block=False)
            result = step_frames.decode_frame(frame) if frame is not None else None
        except (PeerGone, ValueError):
            return ""
        if isinstance(result, step_frames.ErrorFrame) and result.message.startswith(FENCED):
            return result.message
        return ""

    def abort(self, reason: str) -> None:
        self.channel.interrupt(reason)

    def close(self) -> None:
        self.channel.close()
