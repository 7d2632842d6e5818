"""Bearer-token authentication of the public API, as a grpc.aio server interceptor.

Tokens come from `--auth-token-file` (one per line; blank lines and `#` comments
skipped) and from NANOPLANE_CP_AUTH_TOKENS (comma-separated) — never from a flag, so
they do not show in `ps` or in the configuration logged at start-up. A call must send
the metadata `authorization: Bearer <token>`. Health and reflection stay open.

The Admin API (drain, undrain, join, list the data planes) has its own tokens,
`--admin-token-file` and NANOPLANE_CP_ADMIN_TOKENS: a public token does not open it, an
admin token does not open the public API, and without admin tokens it refuses every call.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import grpc
import structlog

from controlplane.ops.interceptors import is_open_method, rejecting_handler

log = structlog.get_logger("controlplane.ops.auth")

TOKENS_ENV = "NANOPLANE_CP_AUTH_TOKENS"
ADMIN_TOKENS_ENV = "NANOPLANE_CP_ADMIN_TOKENS"
ADMIN_SERVICE = "nanoplane.v1.Admin"
ADMIN_OFF = ("the Admin API is off: start the control plane with --admin-token-file (or NANOPLANE_CP_ADMIN_TOKENS) "
             "and send one of those tokens")
MISSING = ('missing credentials: this server requires a bearer token; send the metadata '
           '"authorization: Bearer <token>"')
INVALID = "invalid bearer token"


def _tokens_in_file(path: str) -> list[str]:
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def token_file_problem(path: str, flag: str = "--auth-token-file") -> str | None:
    try:
        if not _tokens_in_file(path):
            return f"{flag} {path!r} holds no token"
    except (OSError, UnicodeDecodeError) as e:
        return f"{flag} {path!r} cannot be read: {e}"
    return None


def load_tokens(token_file: str = "", environ: dict | None = None, env_name: str = TOKENS_ENV) -> list[str]:
    """Every accepted token; an empty list means authentication is off."""
    environ = os.environ if environ is None else environ
    tokens = _tokens_in_file(token_file) if token_file else []
    tokens += [t.strip() for t in environ.get(env_name, "").split(",") if t.strip()]
    return tokens


def is_admin_method(method: str) -> bool:
    return method.lstrip("/").split("/", 1)[0] == ADMIN_SERVICE


def _digest(token: str) -> bytes:
    # compared as fixed-length digests, so neither the length nor the content of a token leaks through timing
    return hashlib.sha256(token.encode()).digest()


class BearerTokens:
    """The accepted tokens, checked against an `Authorization` header (of gRPC metadata or HTTP)."""

    def __init__(self, tokens: list[str]):
        self._digests = [_digest(t) for t in tokens]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self._digests:  # no early exit: the time taken does not say which token matched
            matched |= hmac.compare_digest(digest, presented)
        return matched

    def problem(self, header: str) -> str | None:
        """None when the header carries an accepted token, else what is wrong (MISSING or INVALID)."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MISSING
        return None if self.accepts(token.strip()) else INVALID


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Checks the public API's calls (admin=False) or the Admin API's (admin=True); the others pass. The Admin
    API without tokens refuses every call."""

    def __init__(self, tokens: list[str], admin: bool = False):
        if not tokens and not admin:
            raise ValueError("BearerTokenAuth needs at least one token")
        self.tokens = BearerTokens(tokens)
        self.admin = admin

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open_method(method) or is_admin_method(method) != self.admin:
            return handler
        if not self.tokens:
            log.warning("admin call refused", method=method, reason="no admin tokens configured")
            return rejecting_handler(handler, grpc.StatusCode.PERMISSION_DENIED, ADMIN_OFF)
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        problem = self.tokens.problem(header)
        if problem is not None:
            log.warning("unauthenticated call", method=method,
                        reason="no bearer token" if problem is MISSING else "invalid token")
            return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
        return handler
