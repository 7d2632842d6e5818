"""Shared-memory step sessions: the data plane's Unix socket, for control planes on the same host.

Describe advertises this host's identity, the socket's path and a ticket (random, per
process); a control plane that matches the identity connects, presents HMAC(token, ticket)
(proto/dataplane_access.session_proof: only a peer that holds the data plane's token and
could call Describe gets a session; the bare ticket without a token only when the data plane
has none, under mutual TLS or --insecure) and its memfd (proto/shm_channel.py). The socket
is owner-only (0600, in a 0700 directory for auto). Each session runs dataplane/step_loop.py's
loop under the same StepSessions as the gRPC Step stream: one control plane at a time, the
newest fencing the older. A rejected plan or a fence ends the session with an ERROR frame
carrying the reason.
"""
from __future__ import annotations

import hmac
import os
import secrets
import shutil
import socket
import stat
import tempfile
import threading

import structlog

from dataplane.sessions import BUSY, SessionFenced, StepSessions
from dataplane.step_loop import END, PlanRejected, run_steps
from proto import step_frames
from proto.dataplane_access import session_proof
from proto.shm_channel import (DEFAULT_SPIN_S, MessageTooLarge, PeerGone, ShmChannel, accept_session, host_identity,
                               read_session_request, refuse_session)
from proto.step import StepPlan

log = structlog.get_logger("dataplane.shm_server")


class ShmPlanSource:
    def __init__(self, channel: ShmChannel):
        self.channel = channel
        self.fenced = ""

    def fence(self, message: str) -> None:
        self.fenced = message
        self.channel.interrupt(message)  # wakes a receive() that waits

    def next_plan(self, block: bool):
        if self.fenced:
            raise SessionFenced(self.fenced)
        try:
            frame = self.channel.receive(block)
        except PeerGone:
            if self.fenced:
                raise SessionFenced(self.fenced) from None
            return END
        if frame is None:
            return None
        try:
            plan = step_frames.decode_frame(frame)
        except ValueError as e:
            raise PlanRejected(step_frames.peek_step_id(frame), str(e)) from e
        if not isinstance(plan, StepPlan):
            raise PlanRejected(plan.step_id, f"expected a plan frame, got {type(plan).__name__}")
        return plan


def _prepare_path(path: str) -> tuple[str, str | None]:
    """-> (socket path, a directory this server made and removes); "auto" = a private temporary directory."""
    if path == "auto":
        directory = tempfile.mkdtemp(prefix="nanoplane-dp-")
        return os.path.join(directory, "step.sock"), directory
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise RuntimeError(f"--shm-socket {path!r} exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(path) == 0:
                raise RuntimeError(f"--shm-socket {path!r} is in use by another data plane")
        os.unlink(path)  # left by a data plane that died
    return path, None


class ShmSessionServer:
    def __init__(self, runner, sessions: StepSessions, path: str = "auto", spin_s: float = DEFAULT_SPIN_S):
        self.runner, self.sessions, self.spin_s = runner, sessions, spin_s
        self.host_id = host_identity()
        self.ticket = secrets.token_bytes(32)
        self.token: str | None = None  # the data plane's; set by build_server before start()
        self.path, self._own_dir = _prepare_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)  # other users cannot even connect
        except OSError as e:
            self._listener.close()
            raise RuntimeError(f"could not listen on the Unix socket {self.path!r} (--shm-socket): {e}") from e
        self._listener.listen(8)
        self._channels: set[ShmChannel] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="shm-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("shared-memory step sessions on", socket=self.path, host_id=self.host_id)

    def stop(self) -> None:
        """Refuses new sessions and ends the open one (its control plane sees EOF at once)."""
        self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for channel in list(self._channels):
                channel.close()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        elif os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(conn,), name="shm-session", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = read_session_request(conn)
        except (ValueError, OSError) as e:
            log.warning("refused a shared-memory session", reason=str(e))
            refuse_session(conn, str(e))
            return
        if not hmac.compare_digest(request.ticket, session_proof(self.token, self.ticket)):
            os.close(request.fd)
            refuse_session(conn, "the session proof does not match this data plane's ticket and token: call Describe "
                                 "again with the data plane's token (the data plane restarted?)")
            return
        try:
            channel = accept_session(conn, request, self.spin_s)
        except (ValueError, OSError) as e:
            refuse_session(conn, f"could not map the shared-memory ring: {e}")
            return
        source = ShmPlanSource(channel)
        epoch = self.sessions.open(source.fence, "shm")
        if epoch is None:
            self._send_error(channel, -1, BUSY)
            channel.close()
            return
        try:
            self._run_session(channel, source, request.slot_bytes, epoch)
        finally:
            self.sessions.close(epoch)

    def _run_session(self, channel: ShmChannel, source: ShmPlanSource, slot_bytes: int, epoch: int) -> None:
        with self._lock:
            if self._stopped:
                channel.close()
                return
            self._channels.add(channel)
        log.info("control plane connected", transport="shm", slot_bytes=slot_bytes, epoch=epoch)
        step_id = -1
        try:
            for result in run_steps(self.runner, source):
                step_id = result.step_id
                channel.send(step_frames.encode_result(result))
            log.info("control plane disconnected", transport="shm")
        except PeerGone:
            log.info("control plane disconnected", transport="shm")
        except SessionFenced as e:
            self._send_error(channel, step_id, str(e))
        except (PlanRejected, MessageTooLarge) as e:
            self._send_error(channel, getattr(e, "step_id", step_id), str(e))
        except Exception as e:  # a bug or a device failure: tell the control plane rather than vanish
            log.exception("step session failed")
            self._send_error(channel, step_id, f"the data plane failed: {type(e).__name__}: {e}")
        finally:
            channel.close()
            with self._lock:
                self._channels.discard(channel)

    @staticmethod
    def _send_error(channel: ShmChannel, step_id: int, message: str) -> None:
        try:
            channel.send(step_frames.encode_error(step_id, message))
        except (PeerGone, MessageTooLarge, OSError):
            pass
