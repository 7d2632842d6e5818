"""gRPC settings both planes share: PEM files read with clear errors, keepalive and message-size options.

Keepalive is what lets either end notice a peer that vanished without closing its
socket (host down, cable pulled, network partition): the pinging side sends an HTTP/2
PING every `time_s` and gives up on the connection when no answer comes within
`timeout_s`. A server must allow pings at least that often, or it answers a client's
pings with GOAWAY "too_many_pings"; `server_options` allows one per
MIN_PING_INTERVAL_S, with or without calls in flight.
"""
from __future__ import annotations

from pathlib import Path

MIN_PING_INTERVAL_S = 1.0  # the fastest client ping rate a nanoplane server accepts


def check_pem_file(path: str, flag: str, kind: str) -> str | None:
    """A problem with the PEM file named by `flag`, or None; kind is "certificate" or "private key"."""
    p = Path(path)
    if not p.is_file():
        return f"{flag} {path!r} is not a readable file"
    try:
        text = p.read_text(errors="replace")
    except OSError as e:
        return f"{flag} {path!r} cannot be read: {e.strerror}"
    marker = "PRIVATE KEY-----" if kind == "private key" else "-----BEGIN CERTIFICATE-----"
    if marker not in text:
        return f"{flag} {path!r} holds no PEM {kind}"
    return None


def read_pem(path: str) -> bytes:
    return Path(path).read_bytes()


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def server_options(max_message_bytes: int, keepalive_s: float, keepalive_timeout_s: float) -> list[tuple[str, int]]:
    """Options of a nanoplane gRPC server: size limits, pings to its clients, and which client pings it accepts."""
    return message_size_options(max_message_bytes) + [
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_INTERVAL_S * 1000)),
    ]


def client_options(max_message_bytes: int, keepalive_s: float, keepalive_timeout_s: float) -> list[tuple[str, int]]:
    """Options of a channel that must notice a dead server within keepalive_s + keepalive_timeout_s,
    and find it again within seconds when it comes back."""
    return message_size_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
