"""Channels to a secured nanoplane server: TLS that verifies the server against a CA, and a bearer token.

`tls_ca`: None = plaintext; a path (str or Path) or PEM bytes = TLS with that CA; True =
TLS with gRPC's default roots. `token` goes on every call as `authorization: Bearer
<token>` (by a client interceptor, so it works on plaintext loopback too; send it over
TLS anywhere else).
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import grpc

TlsCa = str | os.PathLike | bytes | bool | None


def _root_certificates(tls_ca: TlsCa) -> bytes | None:
    if tls_ca is True:
        return None
    if isinstance(tls_ca, bytes):
        return tls_ca
    path = Path(tls_ca)
    if not path.is_file():
        raise FileNotFoundError(f"tls_ca {str(path)!r} is not a file (give a CA certificate in PEM)")
    return path.read_bytes()


def _token_metadata(token: str) -> tuple[str, str]:
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("token must be a non-empty single-line string")
    return ("authorization", f"Bearer {token}")


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = _token_metadata(token)

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._metadata], d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _AioTokenDetails:
    def __init__(self, token: str):
        self._metadata = _token_metadata(token)

    def _details(self, d):
        metadata = grpc.aio.Metadata(*tuple(d.metadata or ()), self._metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the first kind it is an instance of, so one class per kind
class _AioBearerTokenUnary(_AioTokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerTokenStream(_AioTokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def sync_channel(target: str, options: list, tls_ca: TlsCa = None, token: str | None = None) -> grpc.Channel:
    if tls_ca is None or tls_ca is False:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(_root_certificates(tls_ca)), options=options)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token is not None else channel


def aio_channel(target: str, options: list, tls_ca: TlsCa = None, token: str | None = None) -> grpc.aio.Channel:
    interceptors = [_AioBearerTokenUnary(token), _AioBearerTokenStream(token)] if token is not None else None
    if tls_ca is None or tls_ca is False:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(_root_certificates(tls_ca)), options=options,
                                   interceptors=interceptors)
