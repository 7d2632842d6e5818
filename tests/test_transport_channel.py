"""The shared-memory transport's parts: raw step frames, the ring channel (wrap-around, large messages, a peer
that dies during a wait) and the session handshake."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from proto import step_frames
from proto.shm_channel import (MessageTooLarge, PeerGone, SessionRefused, accept_session, open_session,
                               read_session_request, refuse_session)
from proto.step import PLAN_ARRAYS, RESULT_ARRAYS, StepResult
from tests.stack import ROOT
from tests.test_step_codec import sample_plan


def test_plan_and_result_round_trip_through_frames():
    plan = sample_plan()
    back = step_frames.decode_frame(b"".join(step_frames.encode_plan(plan)))
    assert back.step_id == plan.step_id
    for name, dtype in PLAN_ARRAYS.items():
        assert getattr(back, name).dtype == dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name), err_msg=name)
    result = StepResult(step_id=9, slots=np.array([1, 0], np.int32), token_ids=np.array([5, 6], np.int32),
                        logprob_rows=np.array([1], np.int32), logprobs=np.array([-0.5], np.float32),
                        logprob_ranks=np.array([1], np.int32), top_token_ids=np.array([6, 7], np.int32),
                        top_logprobs=np.array([-0.5, -1.0], np.float32))
    back = step_frames.decode_frame(b"".join(step_frames.encode_result(result)))
    for name in RESULT_ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(result, name), err_msg=name)
    error = step_frames.decode_frame(b"".join(step_frames.encode_error(4, "plan 4 rejected: slot 9 ≥ 8")))
    assert error == step_frames.ErrorFrame(4, "plan 4 rejected: slot 9 ≥ 8")


def test_bad_frames_are_refused_with_a_reason():
    frame = bytearray(b"".join(step_frames.encode_plan(sample_plan())))
    with pytest.raises(ValueError, match="different versions"):
        step_frames.decode_frame(b"\0" * 8 + bytes(frame[8:]))
    with pytest.raises(ValueError, match="add up to"):
        step_frames.decode_frame(bytes(frame[:-4]))
    with pytest.raises(ValueError, match="token ids"):  # consistent frame, inconsistent plan: plan.check() runs
        plan = sample_plan()
        plan.token_ids = plan.token_ids[:3]
        step_frames.decode_frame(b"".join(step_frames.encode_plan(plan)))
    assert step_frames.peek_step_id(bytes(frame)) == 7


class Pair:
    """Both ends of a session over a real Unix socket and memfd, in this process."""

    def __init__(self, tmp_path, slot_bytes=4096, num_slots=4, refuse: str | None = None):
        path = str(tmp_path / "s.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
        box = {}

        def serve():
            conn, _ = listener.accept()
            request = read_session_request(conn)
            if refuse:
                os.close(request.fd)
                refuse_session(conn, refuse)
            else:
                box["server"] = accept_session(conn, request)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            self.client = open_session(path, b"ticket", slot_bytes, num_slots)
        finally:
            thread.join(10)
            listener.close()
        self.server = box["server"]


def test_messages_wrap_around_the_ring_in_order(tmp_path):
    pair = Pair(tmp_path, slot_bytes=4096, num_slots=4)
    rng = np.random.default_rng(0)
    sent = [rng.integers(0, 256, rng.integers(0, 4096), dtype=np.uint8).tobytes() for _ in range(50)]
    got = []
    for i in range(0, 50, 3):  # up to 3 in flight at a time, 50 messages through 4 slots
        for message in sent[i:i + 3]:
            pair.client.send([message[:10], message[10:]])  # parts are concatenated
        while len(got) < min(i + 3, 50):
            got.append(pair.server.receive())
    assert got == sent
    assert pair.server.receive(block=False) is None
    pair.server.send([b"back"])
    assert pair.client.receive() == b"back"


def test_a_full_ring_waits_for_the_receiver(tmp_path):
    pair = Pair(tmp_path, slot_bytes=64, num_slots=2)
    pair.client.send([b"1"])
    pair.client.send([b"2"])
    threading.Timer(0.2, lambda: pair.server.receive()).start()
    started = time.monotonic()
    pair.client.send([b"3"])  # waits until the receiver took "1"
    assert time.monotonic() - started >= 0.1
    assert [pair.server.receive(), pair.server.receive()] == [b"2", b"3"]


def test_large_messages_fit_up_to_the_slot_and_no_further(tmp_path):
    slot = 8 * 2**20
    pair = Pair(tmp_path, slot_bytes=slot, num_slots=2)
    big = np.random.default_rng(1).integers(0, 256, slot, dtype=np.uint8)
    pair.client.send([memoryview(big)])
    assert pair.server.receive() == big.tobytes()
    with pytest.raises(MessageTooLarge, match="--dataplane-max-message-bytes"):
        pair.client.send([b"x" * (slot + 1)])


def test_a_waiting_receiver_sees_the_peer_close_at_once(tmp_path):
    pair = Pair(tmp_path)
    threading.Timer(0.3, pair.server.close).start()
    started = time.monotonic()
    with pytest.raises(PeerGone):
        pair.client.receive()
    assert time.monotonic() - started < 5
    assert not pair.client.peer_alive()


def test_a_refused_session_says_why(tmp_path):
    with pytest.raises(SessionRefused, match="another control plane"):
        Pair(tmp_path, refuse="another control plane holds the step session")


PEER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from proto.shm_channel import open_session
channel = open_session(sys.argv[1], b"t", 4096)
channel.send([b"hello"])
time.sleep(600)
"""


def test_kill_9_of_the_peer_during_a_wait_is_seen_at_once(tmp_path):
    path = str(tmp_path / "k.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    peer = subprocess.Popen([sys.executable, "-c", PEER, path, str(ROOT)])
    try:
        conn, _ = listener.accept()
        channel = accept_session(conn, read_session_request(conn))
        assert channel.receive() == b"hello"
        threading.Timer(0.3, lambda: os.kill(peer.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(PeerGone, match="process ended"):
            channel.receive()  # asleep on the doorbell when the kill comes
        assert time.monotonic() - started < 5
    finally:
        peer.kill()
        peer.wait(10)
        listener.close()
