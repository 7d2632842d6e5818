"""Exceptions of the client library: one per gRPC status a caller may want to handle."""
from __future__ import annotations

import grpc


class NanoplaneError(Exception):
    """A call to the nanoplane server failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(NanoplaneError):
    """The request was rejected; the message names the field and the limit."""


class UnavailableError(NanoplaneError):
    """The server or its data plane cannot be reached right now; retrying later may work."""


class DeadlineExceededError(NanoplaneError, TimeoutError):
    """The call did not finish within its timeout."""


class ResourceExhaustedError(NanoplaneError):
    """The server is overloaded (retry after `retry_after_s`, its hint), or a message was larger than
    the server or client accepts (`retry_after_s` None: retrying the same call will not help)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


class CancelledError(NanoplaneError):
    """The call was cancelled."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


RETRY_AFTER_METADATA = "retry-after-ms"


def _retry_after_s(error: grpc.RpcError) -> float | None:
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_METADATA:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> NanoplaneError:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(code, details, _retry_after_s(error))
    return _BY_CODE.get(code, NanoplaneError)(code, details)
