"""A bare HTTP/2 client for hostile-input tests: frames written by hand, so a test can break the protocol on purpose
(a DATA frame on a stream the client already ended, a gRPC length prefix that lies), which grpcio never sends.

Only what those tests need: plaintext, the connection preface, SETTINGS (and their ACK),
HEADERS as HPACK literals without Huffman coding, DATA, and reading frames back.
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
ERROR_CODES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
               0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM", 0x8: "CANCEL"}


@dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error(self) -> str:
        """RST_STREAM's or GOAWAY's error code, by name."""
        code = struct.unpack(">I", self.payload[:4] if self.type == RST_STREAM else self.payload[4:8])[0]
        return ERROR_CODES.get(code, hex(code))


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([type_, flags]) + struct.pack(">I", stream_id) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def hpack_literals(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    out = b""
    for name, value in headers:
        out += b"\x00" + _hpack_int(len(name)) + name.encode() + _hpack_int(len(value)) + value.encode()
    return out


def grpc_message(body: bytes, declared_length: int | None = None) -> bytes:
    """gRPC's length-prefixed message: uncompressed flag, 4-byte big-endian length (a lie when declared_length)."""
    return b"\x00" + struct.pack(">I", len(body) if declared_length is None else declared_length) + body


class RawConnection:
    def __init__(self, host: str, port: int, timeout_s: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def grpc_headers(self, stream_id: int, authority: str, path: str) -> None:
        block = hpack_literals([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
                                ("content-type", "application/grpc"), ("te", "trailers")])
        self.send(frame(HEADERS, END_HEADERS, stream_id, block))

    def _read_frame(self) -> Frame | None:
        while len(self._buffer) < 9 or len(self._buffer) < 9 + int.from_bytes(self._buffer[:3], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        length = int.from_bytes(self._buffer[:3], "big")
        type_, flags = self._buffer[3], self._buffer[4]
        stream_id = struct.unpack(">I", self._buffer[5:9])[0] & 0x7FFFFFFF
        payload, self._buffer = self._buffer[9:9 + length], self._buffer[9 + length:]
        if type_ == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        if type_ == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, payload))
        return Frame(type_, flags, stream_id, payload)

    def frames_until(self, done, timeout_s: float = 10.0) -> list[Frame]:
        """Frames the server sends until done(frame) is true, it closes the connection, or timeout_s passes."""
        frames, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                f = self._read_frame()
            except (socket.timeout, ConnectionError):
                break
            if f is None:
                break
            frames.append(f)
            if done(f):
                break
        return frames

    def close(self) -> None:
        self.sock.close()
