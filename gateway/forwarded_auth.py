"""The gateway's gRPC channel, which forwards each HTTP caller's Authorization header as call metadata.

So the gateway holds no credentials of its own: a control plane with bearer-token auth
(controlplane/ops/auth.py) checks every caller's token (OpenAI clients send their api_key as
`Authorization: Bearer <key>`), and one without auth ignores the header. The gateway sets
`forwarded_authorization` for the request it is handling; asyncio tasks started while
handling it inherit the value (contextvars).
"""
from __future__ import annotations

import contextvars

import grpc

forwarded_authorization: contextvars.ContextVar[str | None] = contextvars.ContextVar("forwarded_authorization",
                                                                                       default=None)


def is_valid_header_value(value: str) -> bool:
    """gRPC metadata values must be printable ASCII."""
    return value.isascii() and value.isprintable()


class _Forward:
    @staticmethod
    def _details(d):
        value = forwarded_authorization.get()
        if value is None:
            return d
        metadata = grpc.aio.Metadata(*tuple(d.metadata or ()), ("authorization", value))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the first kind it is an instance of, so one class per kind
class _ForwardUnary(_Forward, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _ForwardStream(_Forward, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def forwarding_channel(target: str, options: list, root_certificates: bytes | None = None) -> grpc.aio.Channel:
    """Plaintext, or TLS verified against root_certificates (PEM) when given."""
    interceptors = [_ForwardUnary(), _ForwardStream()]
    if root_certificates is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options,
                                   interceptors=interceptors)
