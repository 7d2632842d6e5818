"""OpenAIService: what the OpenAI routes do, over the gRPC API (through AsyncClient).

openai_protocol.py turns a body into a GenerationJob; each of its prompts becomes one
Generate call (asking the server for the job's n samples); openai_responses.py shapes the
replies as OpenAI's: a dict (one JSON body) or server-sent events ending in
`data: [DONE]`. gRPC errors raise NanoplaneError, which http_gateway.py answers in
OpenAI's shape. The caller's Authorization header rides along (forwarded_auth.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AsyncClient, NanoplaneError
from client.sync_client import CHANNEL_OPTIONS
from client.types import GenerationDelta, GenerationResult, ModelInfo, results_by_index
from gateway.forwarded_auth import forwarding_channel
from gateway.openai_protocol import GenerationJob, OpenAIError, error_of
from gateway.openai_responses import chat_delta_choice, chunk, completion_choice, full_body, sse, usage_of
from proto.model_names import model_name_of_file

log = structlog.get_logger("gateway.openai_service")

READY_TIMEOUT_S = 2.0  # a readiness probe's question to the control plane


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


class OpenAIService:
    def __init__(self, target: str, root_certificates: bytes | None = None):
        # made on the serving loop: a grpc.aio channel belongs to the loop it is made on
        self.client = AsyncClient(target, channel=forwarding_channel(target, CHANNEL_OPTIONS, root_certificates))
        self.health = health_pb2_grpc.HealthStub(self.client.channel)
        self.created = int(time.time())

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> str | None:
        """None when the control plane says SERVING (grpc.health.v1, which needs no token), else why not."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=READY_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            return f"the control plane does not answer ({e.code().name}: {e.details()})"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"the control plane is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

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

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(await self.client.model_info())]}

    async def model(self, name: str) -> dict:
        await self._model_name(name)
        return self._model_card(await self.client.model_info())

    async def generate(self, job: GenerationJob) -> dict | AsyncIterator[bytes]:
        """A whole OpenAI body, or (job.stream) its server-sent events: a request the server refuses raises
        before the first event, so that it gets its 4xx rather than a 200 stream."""
        model = await self._model_name(job.model)
        request_id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = [self.client.generate_stream(None if job.chat else prompt, job.params,
                                               messages=prompt if job.chat else None, request_id=f"{request_id}-{p}")
                   for p, prompt in enumerate(job.prompts)]
        if not job.stream:
            results = [r for samples in await gather_or_cancel(_collect(s) for s in streams) for r in samples]
            return full_body(request_id, created, model, results, job.n, chat=job.chat, with_logprobs=job.logprobs)
        try:
            firsts = await gather_or_cancel(_first(s) for s in streams)
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return self._events(job, request_id, created, model, streams, firsts)

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
