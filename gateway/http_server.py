"""A small HTTP/1.1 server on asyncio streams, enough for the OpenAI-compatible gateway.

Requests need a Content-Length body (no chunked request bodies), bounded by
max_body_bytes (413 beyond it, answered before the body is read); keep-alive is
honoured for ordinary responses; a server-sent event stream closes its connection
when it ends, since it has no length. The handler returns an HttpResponse or an
EventStream; errors of the framing itself are answered by `error_response`.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Awaitable, Callable

import structlog

log = structlog.get_logger("controlplane.http")

MAX_LINE_BYTES = 16 * 1024
MAX_HEADERS = 100
READ_TIMEOUT_S = 60.0  # a whole request (or the idle time of a kept-alive connection)


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        return connection == "keep-alive" if self.version == "HTTP/1.0" else connection != "close"


@dataclass
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class EventStream:
    """A text/event-stream response: each item of `chunks` is written and flushed as it comes."""
    chunks: AsyncIterator[bytes]


Handler = Callable[[HttpRequest], Awaitable["HttpResponse | EventStream"]]
ErrorResponse = Callable[[int, str], HttpResponse]


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"a request line or header is longer than {MAX_LINE_BYTES} bytes") from None


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       max_body_bytes: int) -> HttpRequest | None:
    """Reads one request; None at a clean end of the connection."""
    try:
        line = await _read_line(reader)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise HttpError(400, "the connection closed inside the request line") from None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400, "malformed request line; expected `METHOD /path HTTP/1.1`")
    method, target, version = parts
    headers = {}
    while True:
        line = await _read_line(reader)
        if line == b"\r\n":
            break
        if len(headers) >= MAX_HEADERS:
            raise HttpError(431, f"more than {MAX_HEADERS} headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not supported; send a Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, f"Content-Length must be an integer, got {headers['content-length']!r}") from None
    if length < 0:
        raise HttpError(400, "Content-Length must not be negative")
    if length > max_body_bytes:
        raise HttpError(413, f"the body has {length} bytes; the limit is {max_body_bytes}")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    body = await reader.readexactly(length) if length else b""
    path, _, query = target.partition("?")
    return HttpRequest(method.upper(), path, query, version, headers, body)


def _head(status: int, content_type: str, headers: dict[str, str], *, length: int | None, keep_alive: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_response(writer: asyncio.StreamWriter, response: HttpResponse, keep_alive: bool) -> None:
    writer.write(_head(response.status, response.content_type, response.headers, length=len(response.body),
                       keep_alive=keep_alive) + response.body)
    await writer.drain()


async def write_event_stream(writer: asyncio.StreamWriter, stream: EventStream) -> None:
    writer.write(_head(200, "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache"}, length=None,
                       keep_alive=False))
    # aclosing: when the client goes away mid-stream, the generator's finally cancels its gRPC calls now
    async with contextlib.aclosing(stream.chunks) as chunks:
        async for chunk in chunks:
            writer.write(chunk)
            await writer.drain()


class HttpServer:
    def __init__(self, handler: Handler, error_response: ErrorResponse, max_body_bytes: int):
        self.handler = handler
        self.error_response = error_response
        self.max_body_bytes = max_body_bytes

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, limit=MAX_LINE_BYTES)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(read_request(reader, writer, self.max_body_bytes),
                                                     READ_TIMEOUT_S)
                except HttpError as e:  # the stream may be mid-request: answer and close
                    await write_response(writer, self.error_response(e.status, e.message), keep_alive=False)
                    return
                if request is None:
                    return
                try:
                    response = await self.handler(request)
                except Exception:
                    log.exception("HTTP handler failed", method=request.method, path=request.path)
                    response = self.error_response(500, "internal error; see the gateway's log")
                if isinstance(response, EventStream):
                    await write_event_stream(writer, response)
                    return
                await write_response(writer, response, request.keep_alive)
                if not request.keep_alive:
                    return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            return  # the client went away or stalled
        except Exception:  # a failure inside an event stream, after its 200 was sent: all we can do is close
            log.exception("HTTP connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
