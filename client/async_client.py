"""AsyncClient: the asyncio client of the nanoplane Generation API (same methods as Client, awaited)."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc

from client.credentials import TlsCa, aio_channel
from client.errors import from_rpc_error
from client.retry import RetryPolicy, deadline_of, time_left
from client.sync_client import CHANNEL_OPTIONS
from client.types import (GenerationDelta, GenerationResult, ModelInfo, Prompt, SamplingParams,
                          chat_messages_proto, delta_from_proto, generate_request, results_by_index)
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of Client, with the same timeout, TLS, token and retry options."""

    def __init__(self, target: str = "localhost:50051", *, timeout_s: float | None = None,
                 channel: grpc.aio.Channel | None = None, tls_ca: TlsCa = None, token: str | None = None,
                 retries: int = 3, backoff_s: float = 0.2, retry_partial: bool = False):
        self.target = target
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries, backoff_s, retry_partial)
        self.channel = channel or aio_channel(target, CHANNEL_OPTIONS, tls_ca, token)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, call: Callable[[float | None], Awaitable[T]]) -> T:
        deadline = deadline_of(self.timeout_s)
        attempt = 0
        while True:
            try:
                return await call(time_left(deadline))
            except grpc.RpcError as e:
                delay = self.retry.next_delay_s(e, attempt, False, deadline)
                if delay is None:
                    raise from_rpc_error(e) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def generate_stream(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                              messages: Sequence[dict] | None = None, request_id: str = "",
                              timeout_s: float | None = None,
                              retry_partial: bool | None = None) -> AsyncIterator[GenerationDelta]:
        request = generate_request(prompt, params, messages=messages, request_id=request_id)
        deadline = deadline_of(timeout_s if timeout_s is not None else self.timeout_s)
        produced = False
        attempt = 0
        while True:
            call = self.stub.Generate(request, timeout=time_left(deadline))
            restarted = produced
            try:
                async for pb in call:
                    delta = delta_from_proto(pb)
                    if restarted:
                        delta, restarted = dataclasses.replace(delta, restarted=True), False
                    produced = True
                    yield delta
                return
            except grpc.RpcError as e:
                delay = self.retry.next_delay_s(e, attempt, produced, deadline, retry_partial)
                if delay is None:
                    raise from_rpc_error(e) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                       messages: Sequence[dict] | None = None, request_id: str = "",
                       timeout_s: float | None = None, retry_partial: bool | None = None) -> GenerationResult:
        """One sample (sampling.n must be 1 or unset: generate_n returns several)."""
        if params is not None and params.n is not None and params.n > 1:
            raise ValueError(f"SamplingParams.n is {params.n}: use generate_n for several samples")
        result = GenerationResult()
        async for delta in self.generate_stream(prompt, params, messages=messages, request_id=request_id,
                                                timeout_s=timeout_s, retry_partial=retry_partial):
            result.add(delta)
        return result

    async def generate_n(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                         messages: Sequence[dict] | None = None, request_id: str = "",
                         timeout_s: float | None = None, retry_partial: bool | None = None) -> list[GenerationResult]:
        """The params.n samples of one prompt, which share its KV blocks: one result per sample, by index."""
        deltas = [delta async for delta in self.generate_stream(prompt, params, messages=messages,
                                                              request_id=request_id, timeout_s=timeout_s,
                                                              retry_partial=retry_partial)]
        return results_by_index(deltas)

    async def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, *,
                   timeout_s: float | None = None) -> GenerationResult:
        return await self.generate(params=params, messages=messages, timeout_s=timeout_s)

    async def tokenize(self, text: str | None = None, *, messages: Sequence[dict] | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        request = generation_pb2.TokenizeRequest(add_special_tokens=add_special_tokens)
        if messages is not None:
            request.messages.CopyFrom(chat_messages_proto(messages))
        else:
            request.prompt = text or ""
        return list((await self._unary(lambda timeout: self.stub.Tokenize(request, timeout=timeout))).token_ids)

    async def model_info(self) -> ModelInfo:
        return ModelInfo.from_proto(await self._unary(
            lambda timeout: self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout)))
