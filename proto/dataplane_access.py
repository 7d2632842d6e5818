"""Who may drive a data plane: its credential (a bearer token) and the fencing of a stale step session.

Both planes use this module: the data plane checks, the control plane presents.

The token travels as `authorization: Bearer <token>` metadata on every DataPlane RPC
(Describe, Step) and, for a shared-memory session, as HMAC-SHA256(token, ticket) in the
session request: the ticket that Describe hands out is worthless without the token.

On one host the token is per launch: the data plane writes it to a file only its user can
read (`default_token_path(port)`, in an owner-only directory), and a control plane pointed at
a loopback address reads it from there; `nanoplane serve` and the offline LLM hand their
children a file of their own. Across hosts it is a file both sides were given.

A step session that a newer one fenced ends with ABORTED (gRPC) or an error frame (shared
memory) whose message starts with FENCED: the stale control plane stops driving.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import tempfile
from pathlib import Path

METADATA_KEY = "authorization"
FENCED = "fenced: "
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def session_proof(token: str | None, ticket: bytes) -> bytes:
    """What a shared-memory session request carries: the ticket itself without a token, else its HMAC."""
    if not token:
        return ticket
    return hmac.new(token.encode(), ticket, hashlib.sha256).digest()


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def runtime_dir() -> Path:
    """A directory only this user can enter: $XDG_RUNTIME_DIR, else /tmp/nanoplane-<uid> (made 0700).
    Raises RuntimeError when the latter exists with another owner or looser permissions (someone planted it)."""
    if os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "nanoplane"
    else:
        path = Path(tempfile.gettempdir()) / f"nanoplane-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"could not make the directory of the data plane's token {str(path)!r}: {e}") from e
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{str(path)!r} must be a directory owned by this user with mode 0700 "
                           f"(it is {stat.filemode(st.st_mode)}, owner {st.st_uid}): remove it")
    return path


def default_token_path(port: int) -> Path:
    """Where a data plane on loopback `port` keeps its per-launch token (--auth-token-file auto)."""
    return runtime_dir() / f"dataplane-{port}.token"


def write_token_file(path: str | os.PathLike, token: str) -> None:
    """Readable by this user only; an existing file (left by a data plane that died) is replaced."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)


def token_file_problem(path: str, flag: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError as e:
        return f"{flag} {path!r} cannot be read: {e.strerror}"
    if not text.strip():
        return f"{flag} {path!r} is empty: it must hold the data plane's token"
    return None


def read_token_file(path: str | os.PathLike) -> str:
    return Path(path).read_text().strip()
