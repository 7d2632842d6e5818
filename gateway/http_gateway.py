"""OpenAIGateway: OpenAI-compatible HTTP (/v1/models, /v1/completions, /v1/chat/completions) over the gRPC API.

A thin client of nanoplane.v1.Generation (through AsyncClient), served by the small
asyncio HTTP server of http_server.py: openai_protocol.py parses a body into a
GenerationJob, each of its prompts becomes one Generate call (asking the server for the
job's n samples), and openai_responses.py shapes the replies as OpenAI's (JSON, or
server-sent events ending in `data: [DONE]`). gRPC errors keep the server's message:
INVALID_ARGUMENT -> 400, UNAUTHENTICATED -> 401, UNAVAILABLE -> 503. The caller's
Authorization header is forwarded (forwarded_auth.py). `nanoplane gateway` and
`nanoplane serve --http-port` start it (gateway_main.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import unquote

import structlog

from client import AsyncClient, NanoplaneError
from client.sync_client import CHANNEL_OPTIONS
from client.types import GenerationDelta, GenerationResult, ModelInfo, results_by_index
from gateway.forwarded_auth import forwarded_authorization, forwarding_channel, is_valid_header_value
from gateway.http_server import EventStream, HttpRequest, HttpResponse, HttpServer
from gateway.openai_protocol import GenerationJob, OpenAIError, error_of, parse_chat_request, \
    parse_completion_request
from gateway.openai_responses import chat_delta_choice, chunk, completion_choice, full_body, sse, usage_of
from proto.model_names import model_name_of_file

log = structlog.get_logger("gateway.http_gateway")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(body, ensure_ascii=False).encode(), headers=headers or {})


def error_response(status: int, message: str) -> HttpResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json_response(status, OpenAIError(status, message, type=kind).body())


def parse_json_body(body: bytes) -> dict:
    if not body:
        raise OpenAIError(400, "the request body is empty; send a JSON object")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return value


async def merge(streams: list[tuple[int, AsyncIterator[GenerationDelta]]]
                ) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Deltas of several streams as they come, tagged with their stream's number; the first error is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(number: int, stream: AsyncIterator[GenerationDelta]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((number, delta, None))
        except Exception as e:
            queue.put_nowait((number, None, e))
        else:
            queue.put_nowait((number, None, None))

    tasks = [asyncio.create_task(pump(number, stream)) for number, stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            number, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                remaining -= 1
            else:
                yield number, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def gather_or_cancel(aws) -> list:
    """asyncio.gather that cancels the rest when one fails (and waits until they are gone)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first(stream: AsyncIterator[GenerationDelta]) -> GenerationDelta | None:
    return await anext(stream, None)


async def _collect(stream: AsyncIterator[GenerationDelta]) -> list[GenerationResult]:
    return results_by_index([delta async for delta in stream])


class OpenAIGateway:
    def __init__(self, target: str, root_certificates: bytes | None = None):
        # made on the serving loop: a grpc.aio channel belongs to the loop it is made on
        self.client = AsyncClient(target, channel=forwarding_channel(target, CHANNEL_OPTIONS, root_certificates))
        self.created = int(time.time())

    async def close(self) -> None:
        await self.client.close()

    async def handle(self, request: HttpRequest) -> HttpResponse | EventStream:
        routes = {"/v1/completions": ("POST", self.completions), "/v1/chat/completions": ("POST", self.chat),
                  "/v1/models": ("GET", self.models), "/health": ("GET", self.health)}
        path = request.path.rstrip("/") or "/"
        method, route = routes.get(path, (None, None))
        if path.startswith("/v1/models/"):
            method, route = "GET", self.model
        try:
            if route is None:
                raise OpenAIError(404, f"no route for {request.method} {request.path}", code="not_found")
            if request.method != method:
                return json_response(405, OpenAIError(405, f"{request.path} takes {method}, not {request.method}",
                                                      code="method_not_allowed").body(), {"Allow": method})
            authorization = request.headers.get("authorization")
            if authorization is not None and not is_valid_header_value(authorization):
                raise OpenAIError(400, "the Authorization header must be printable ASCII", code="invalid_header")
            forwarded_authorization.set(authorization)
            return await route(request)
        except OpenAIError as e:
            return json_response(e.status, e.body())
        except NanoplaneError as e:
            error = error_of(e, chat=path == "/v1/chat/completions")
            return json_response(error.status, error.body())

    async def _model_name(self, requested: str | None) -> str:
        # asked each time, not cached: with auth on, the call checks this caller's token
        name = (await self.client.model_info()).model_name
        if requested is not None and requested != name and not (requested.endswith(".gguf")
                                                                and model_name_of_file(requested) == name):
            raise OpenAIError(404, f"The model `{requested}` does not exist; this server serves `{name}`.",
                              param="model", code="model_not_found")
        return name

    def _model_card(self, info: ModelInfo) -> dict:
        return {"id": info.model_name, "object": "model", "created": self.created, "owned_by": "nanoplane",
                "root": info.model_name, "max_model_len": info.max_model_len}

    async def models(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, {"object": "list", "data": [self._model_card(await self.client.model_info())]})

    async def model(self, request: HttpRequest) -> HttpResponse:
        await self._model_name(unquote(request.path.rstrip("/")[len("/v1/models/"):]))
        return json_response(200, self._model_card(await self.client.model_info()))

    async def health(self, request: HttpRequest) -> HttpResponse:
        await self.client.model_info()  # UNAVAILABLE -> 503
        return json_response(200, {"status": "ok"})

    async def completions(self, request: HttpRequest) -> HttpResponse | EventStream:
        return await self._generate(parse_completion_request(parse_json_body(request.body)))

    async def chat(self, request: HttpRequest) -> HttpResponse | EventStream:
        return await self._generate(parse_chat_request(parse_json_body(request.body)))

    async def _generate(self, job: GenerationJob) -> HttpResponse | EventStream:
        model = await self._model_name(job.model)
        request_id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = [self.client.generate_stream(None if job.chat else prompt, job.params,
                                               messages=prompt if job.chat else None, request_id=f"{request_id}-{p}")
                   for p, prompt in enumerate(job.prompts)]
        if not job.stream:
            results = [r for samples in await gather_or_cancel(_collect(s) for s in streams) for r in samples]
            return json_response(200, full_body(request_id, created, model, results, job.n, chat=job.chat,
                                                with_logprobs=job.logprobs))
        try:
            # wait for every prompt's first delta, so that a rejected request gets its 4xx, not a 200 stream
            firsts = await gather_or_cancel(_first(s) for s in streams)
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return EventStream(self._events(job, request_id, created, model, streams, firsts))

    async def _events(self, job: GenerationJob, request_id: str, created: int, model: str, streams: list,
                      firsts: list) -> AsyncIterator[bytes]:
        results = [GenerationResult() for _ in range(len(streams) * job.n)]  # choice p * n + sample index

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            return sse(chunk(request_id, created, model, chat=job.chat, choices=choices, usage=usage,
                             include_usage=job.include_usage))

        def events_of(prompt_number: int, delta: GenerationDelta) -> list[bytes]:
            index = prompt_number * job.n + delta.index
            results[index].add(delta)
            logprobs = delta.logprobs if job.logprobs else None
            if not job.chat:
                if not delta.text and not delta.finish_reason and not logprobs:
                    return []
                return [event([completion_choice(index, delta.text, delta.finish_reason, logprobs)])]
            out = []
            if delta.text or logprobs:
                out.append(event([chat_delta_choice(index, {"content": delta.text}, None, logprobs)]))
            if delta.finish_reason:
                out.append(event([chat_delta_choice(index, {}, delta.finish_reason)]))
            return out

        try:
            if job.chat:
                for index in range(len(results)):
                    yield event([chat_delta_choice(index, {"role": "assistant", "content": ""}, None)])
            for number, delta in enumerate(firsts):
                for data in events_of(number, delta) if delta is not None else ():
                    yield data
            live = [(number, s) for number, s in enumerate(streams) if firsts[number] is not None]
            async with contextlib.aclosing(merge(live)) as deltas:
                async for number, delta in deltas:
                    for data in events_of(number, delta):
                        yield data
            if job.include_usage:
                yield event([], usage_of(results, job.n))
        except NanoplaneError as e:  # the stream has begun: the error goes in it, as OpenAI's does
            log.warning("generation failed mid-stream", request_id=request_id, error=str(e))
            yield sse(error_of(e, chat=job.chat).body())
        finally:
            for s in streams:
                await s.aclose()
        yield sse("[DONE]")


@dataclass
class RunningGateway:
    server: asyncio.Server
    gateway: OpenAIGateway
    port: int

    async def stop(self) -> None:
        self.server.close()
        await self.gateway.close()


async def start_http_gateway(target: str, host: str = "127.0.0.1", port: int = 8000, *,
                             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                             root_certificates: bytes | None = None) -> RunningGateway:
    """Serves the gateway on the running event loop, in front of the Generation API at `target`
    (over TLS verified against root_certificates, PEM, when given)."""
    gateway = OpenAIGateway(target, root_certificates)
    server = await HttpServer(gateway.handle, error_response, max_body_bytes).start(host, port)
    port = server.sockets[0].getsockname()[1]
    log.info("OpenAI-compatible HTTP gateway serving", address=f"http://{host}:{port}/v1", target=target)
    return RunningGateway(server, gateway, port)
