"""Start-up checks made from the flags alone, before a model loads or a connection waits: each gives a
sentence saying what to fix, or None.

Both planes and the `nanoplane` command use them, so a mistake costs seconds, not a model load.
"""
from __future__ import annotations

import concurrent.futures
import errno
import socket

RESOLVE_TIMEOUT_S = 5.0


def port_problem(host: str, port: int, flag: str) -> str | None:
    """Whether something already listens on host:port (port 0 = any free one, always fine)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot listen on {host}:{port}: the host does not resolve ({e.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # as the servers bind: SO_REUSEADDR, so that a port in TIME_WAIT counts as free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"{host}:{port}: address already in use, pick another {flag}"
            return f"cannot listen on {host}:{port} ({flag}): {e.strerror}"
    return None


def split_host_port(target: str) -> tuple[str, int | None]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    return host, int(port) if port.isdigit() else None


def resolve_problem(target: str, flag: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """Whether the host of HOST:PORT resolves, within timeout_s (a resolver can hang far longer)."""
    host, port = split_host_port(target)
    if port is None:
        return f"{flag} must be HOST:PORT, got {target!r}"
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="resolve")
    try:
        pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout_s)
    except socket.gaierror as e:
        return f"cannot resolve host {host!r} of {flag} {target}: {e.strerror}"
    except concurrent.futures.TimeoutError:
        return f"cannot resolve host {host!r} of {flag} {target}: no answer within {timeout_s:.0f} s"
    finally:
        pool.shutdown(wait=False)
    return None
