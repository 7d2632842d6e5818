"""Bearer-token authentication of the public API, as a grpc.aio server interceptor.

Tokens come from `--auth-token-file` (one per line; blank lines and `#` comments
skipped) and from NANOPLANE_CP_AUTH_TOKENS (comma-separated) — never from a flag, so
they do not show in `ps` or in the configuration logged at start-up. A call must send
the metadata `authorization: Bearer <token>`. Health and reflection stay open.
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
MISSING = ('missing credentials: this server requires a bearer token; send the metadata '
           '"authorization: Bearer <token>"')
INVALID = "invalid bearer token"


def _tokens_in_file(path: str) -> list[str]:
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def token_file_problem(path: str) -> str | None:
    try:
        if not _tokens_in_file(path):
            return f"--auth-token-file {path!r} holds no token"
    except (OSError, UnicodeDecodeError) as e:
        return f"--auth-token-file {path!r} cannot be read: {e}"
    return None


def load_tokens(token_file: str = "", environ: dict | None = None) -> list[str]:
    """Every accepted token; an empty list means authentication is off."""
    environ = os.environ if environ is None else environ
    tokens = _tokens_in_file(token_file) if token_file else []
    tokens += [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    return tokens


def _digest(token: str) -> bytes:
    # compared as fixed-length digests, so neither the length nor the content of a token leaks through timing
    return hashlib.sha256(token.encode()).digest()


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("BearerTokenAuth needs at least one token")
        self._digests = [_digest(t) for t in tokens]

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self._digests:  # no early exit: the time taken does not say which token matched
            matched |= hmac.compare_digest(digest, presented)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or is_open_method(handler_call_details.method):
            return handler
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            log.warning("unauthenticated call", method=handler_call_details.method, reason="no bearer token")
            return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, MISSING)
        if not self.accepts(token.strip()):
            log.warning("unauthenticated call", method=handler_call_details.method, reason="invalid token")
            return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, INVALID)
        return handler
