"""A shared-memory channel between two unrelated processes on one host: a ring per direction, a socket doorbell.

The control plane opens a session on the data plane's Unix socket (its path and a ticket
come from Describe, over the possibly-TLS gRPC connection) and hands over, with
SCM_RIGHTS, a memfd it created: no name in /dev/shm, nothing to clean up when either
process dies; only the socket path must be shared (a volume, between containers).

The memfd holds, for each direction (TO_DATAPLANE: plans, TO_CONTROLPLANE: results),
a control block of int64 words and `num_slots` slots of `slot_bytes`:
  write_seq  messages published (written by the sender only)
  read_seq   messages consumed (written by the receiver only)
  sleeping   1 while the receiver blocks on the socket (written by the receiver only)
A slot is a length word and the message. The sender writes message i into slot
i % num_slots once read_seq > i - num_slots, then bumps write_seq, and writes one
byte to the socket only when the receiver said it sleeps. The receiver spins on
write_seq for `spin_s` (a step's answer usually comes within it), then sets
`sleeping`, looks once more, and blocks in poll() on the socket: a doorbell byte
wakes it, EOF means the peer is gone (closed, crashed, kill -9) — noticed at once.
A byte may be stale (the message was seen before the sleep); the wait loop just
looks again. The poll also times out every POLL_S to close the window of a lost
wake-up should the fences below not order the flag and the sequence word.

Messages never grow the segment: slot_bytes is the largest message, the same limit
as the gRPC stream's --max-message-bytes (memfd pages cost memory only once written,
so a 64 MiB slot holding 10 KB decode plans uses 10 KB). A larger one raises
MessageTooLarge, naming the flag. Words are aligned int64s (single-copy atomic);
`_fence` (a lock round trip, an atomic read-modify-write) orders the payload before
the sequence word and the flag store before the sequence load.
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

TO_DATAPLANE, TO_CONTROLPLANE = 0, 1
DEFAULT_NUM_SLOTS = 4
DEFAULT_SPIN_S = 50e-6
POLL_S = 0.05
_WORDS_PER_DIRECTION = 16  # write_seq on its own cache line, read_seq and sleeping on the next
_WRITE, _READ, _SLEEPING = 0, 8, 9
_CONTROL_BYTES = 2 * 8 * _WORDS_PER_DIRECTION
_PAGE = 4096
_HELLO = struct.Struct("<8s32sIQ")  # magic, ticket, num_slots, slot_bytes
_MAGIC = b"NPSHM\x00\x01\x00"
_REPLY = struct.Struct("<BI")  # 0 = accepted, else refused; length of the UTF-8 reason
_fence_lock = threading.Lock()


class PeerGone(ConnectionError):
    """The other process closed the session or died."""


class MessageTooLarge(ValueError):
    """A message does not fit a slot of the ring."""


class SessionRefused(ConnectionError):
    """The data plane answered the session request with a refusal (busy, bad ticket, bad parameters)."""


def _fence() -> None:
    with _fence_lock:
        pass


def host_identity() -> str:
    """Equal in two processes that share a kernel, an IPC and a network namespace; empty where it cannot be
    known (not Linux). The network namespace is in it because planes in two of them are set up as two hosts
    (tests/test_two_hosts.py does just that), and a pod's containers share theirs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        ipc_namespace, net_namespace = (os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("ipc", "net"))
    except OSError:
        return ""
    return f"{boot_id}/{socket.gethostname()}/ipc:{ipc_namespace}/net:{net_namespace}"


def _slot_stride(slot_bytes: int) -> int:
    return (8 + slot_bytes + _PAGE - 1) // _PAGE * _PAGE


def segment_bytes(num_slots: int, slot_bytes: int) -> int:
    return _PAGE + 2 * num_slots * _slot_stride(slot_bytes)


class ShmChannel:
    """One end of a session: send() on its outgoing ring, receive() from the other. One thread per direction."""

    def __init__(self, sock: socket.socket, segment: mmap.mmap, num_slots: int, slot_bytes: int, outgoing: int,
                 spin_s: float = DEFAULT_SPIN_S, size_flag: str = "--max-message-bytes"):
        self.sock, self.num_slots, self.slot_bytes, self.spin_s = sock, num_slots, slot_bytes, spin_s
        self.size_flag = size_flag
        self._segment = segment
        words = np.ndarray(2 * _WORDS_PER_DIRECTION, dtype=np.int64, buffer=segment)
        self._out = words[outgoing * _WORDS_PER_DIRECTION:(outgoing + 1) * _WORDS_PER_DIRECTION]
        self._in = words[(1 - outgoing) * _WORDS_PER_DIRECTION:(2 - outgoing) * _WORDS_PER_DIRECTION]
        self._stride = _slot_stride(slot_bytes)
        self._out_base = _PAGE + outgoing * num_slots * self._stride
        self._in_base = _PAGE + (1 - outgoing) * num_slots * self._stride
        self._sent = int(self._out[_WRITE])
        self._received = int(self._in[_READ])
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.closed = False
        self.interrupted = ""  # interrupt(): a receive() that waits raises PeerGone with this

    # --- sending -----------------------------------------------------------------
    def send(self, parts) -> None:
        """Writes one message (bytes-like parts, concatenated) and rings the doorbell if the receiver sleeps."""
        size = sum(memoryview(p).nbytes for p in parts)
        if size > self.slot_bytes:
            raise MessageTooLarge(f"a step message of {size} bytes exceeds the shared-memory slot of "
                                  f"{self.slot_bytes} bytes: raise {self.size_flag}")
        if self._sent - int(self._out[_READ]) >= self.num_slots:
            self._wait_for_free_slot()
        offset = self._out_base + (self._sent % self.num_slots) * self._stride
        self._segment[offset:offset + 8] = size.to_bytes(8, "little")
        offset += 8
        for part in parts:
            n = memoryview(part).nbytes
            self._segment[offset:offset + n] = part
            offset += n
        self._sent += 1
        _fence()
        self._out[_WRITE] = self._sent
        _fence()
        if self._out[_SLEEPING]:
            try:
                self.sock.send(b"\x01")
            except OSError as e:
                raise PeerGone(f"the peer closed the session: {e}") from e

    def _wait_for_free_slot(self) -> None:
        """The receiver has not taken the oldest messages yet (it never lags by num_slots in the step protocol)."""
        checked = time.monotonic()
        while self._sent - int(self._out[_READ]) >= self.num_slots:
            time.sleep(20e-6)
            if time.monotonic() - checked > 1e-3:
                self._check_peer()
                checked = time.monotonic()

    def peer_alive(self) -> bool:
        try:
            self._check_peer()
            return not self.closed
        except PeerGone:
            return False

    def _check_peer(self) -> None:
        try:
            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                raise PeerGone("the peer closed the session")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            raise PeerGone(f"the session broke: {e}") from e

    # --- receiving ---------------------------------------------------------------
    def receive(self, block: bool = True) -> bytes | None:
        """The next message (a copy: its slot is free again on return); None only when block is False and none
        has arrived. Raises PeerGone when the peer has gone, as soon as this end waits."""
        if int(self._in[_WRITE]) == self._received:
            if not block:
                return None
            self._wait_for_message()
        _fence()
        offset = self._in_base + (self._received % self.num_slots) * self._stride
        size = int.from_bytes(self._segment[offset:offset + 8], "little")
        if not 0 <= size <= self.slot_bytes:
            raise PeerGone(f"the peer wrote a message length of {size} bytes: the session is corrupt")
        message = self._segment[offset + 8:offset + 8 + size]
        self._received += 1
        self._in[_READ] = self._received
        return message

    def _wait_for_message(self) -> None:
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            if int(self._in[_WRITE]) != self._received:
                return
        while True:
            self._in[_SLEEPING] = 1
            _fence()
            if int(self._in[_WRITE]) != self._received:
                break
            if self.closed:
                raise PeerGone("the session was closed at this end")
            if self.interrupted:
                self._in[_SLEEPING] = 0
                raise PeerGone(self.interrupted)
            if self._poller.poll(POLL_S * 1000):
                try:
                    if self.sock.recv(4096) == b"":
                        raise PeerGone("the peer closed the session (its process ended)")
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    raise PeerGone(f"the session broke: {e}") from e
        self._in[_SLEEPING] = 0

    def interrupt(self, reason: str) -> None:
        """From another thread: a receive() that waits (or the next one) raises PeerGone(reason) within POLL_S; the
        session stays open, so this end can still send (an error frame saying why)."""
        self.interrupted = reason

    def close(self) -> None:
        """Ends the session; a thread blocked in receive() at either end raises PeerGone. The mapping goes when
        the last reference does (unmapping under a thread still reading it would crash the process)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --- session set-up ------------------------------------------------------------------
@dataclass(slots=True)
class SessionRequest:
    """What a control plane asks for on the data plane's socket; `fd` is its memfd."""

    ticket: bytes
    num_slots: int
    slot_bytes: int
    fd: int


def open_session(path: str, ticket: bytes, slot_bytes: int, num_slots: int = DEFAULT_NUM_SLOTS,
                 spin_s: float = DEFAULT_SPIN_S, timeout_s: float = 10.0,
                 size_flag: str = "--dataplane-max-message-bytes") -> ShmChannel:
    """The control plane's end. Raises OSError when the socket cannot be reached, SessionRefused on a refusal."""
    size = segment_bytes(num_slots, slot_bytes)
    fd = os.memfd_create("nanoplane-step", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        segment = mmap.mmap(fd, size)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
            socket.send_fds(sock, [_HELLO.pack(_MAGIC, ticket.ljust(32, b"\0"), num_slots, slot_bytes)], [fd])
            status, length = _REPLY.unpack(_recv_exactly(sock, _REPLY.size))
            reason = _recv_exactly(sock, length).decode(errors="replace")
            if status:
                raise SessionRefused(reason)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(fd)  # the mapping (here) and the data plane's copy of the fd keep the memory
    return ShmChannel(sock, segment, num_slots, slot_bytes, TO_DATAPLANE, spin_s, size_flag)


def read_session_request(sock: socket.socket, timeout_s: float = 10.0) -> SessionRequest:
    """The data plane's end, first half: what the control plane asks. Raises ValueError on a malformed request."""
    sock.settimeout(timeout_s)
    message, fds, _, _ = socket.recv_fds(sock, _HELLO.size, 1)
    if len(message) != _HELLO.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("not a nanoplane shared-memory session request (wrong size or no memfd attached)")
    magic, ticket, num_slots, slot_bytes = _HELLO.unpack(message)
    if magic != _MAGIC:
        os.close(fds[0])
        raise ValueError("the control plane speaks another version of the shared-memory session protocol")
    return SessionRequest(ticket, num_slots, slot_bytes, fds[0])


def accept_session(sock: socket.socket, request: SessionRequest, spin_s: float = DEFAULT_SPIN_S) -> ShmChannel:
    """The data plane's end, second half: maps the memfd and says yes."""
    try:
        size = segment_bytes(request.num_slots, request.slot_bytes)
        if os.fstat(request.fd).st_size < size:
            raise ValueError(f"the memfd holds {os.fstat(request.fd).st_size} bytes, the ring needs {size}")
        segment = mmap.mmap(request.fd, size)
    finally:
        os.close(request.fd)
    sock.sendall(_REPLY.pack(0, 0))
    sock.settimeout(None)
    return ShmChannel(sock, segment, request.num_slots, request.slot_bytes, TO_CONTROLPLANE, spin_s,
                      "the control plane's --dataplane-max-message-bytes")


def refuse_session(sock: socket.socket, reason: str) -> None:
    data = reason.encode()
    try:
        sock.sendall(_REPLY.pack(1, len(data)) + data)
    except OSError:
        pass
    sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise PeerGone("the data plane closed the session socket during set-up")
        data += chunk
    return data
