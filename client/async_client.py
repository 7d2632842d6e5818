"""AsyncClient: the asyncio client of the nanoplane Generation API (same methods as Client, awaited)."""
from __future__ import annotations

from typing import AsyncIterator, Sequence

import grpc

from client.credentials import TlsCa, aio_channel
from client.errors import from_rpc_error
from client.sync_client import CHANNEL_OPTIONS
from client.types import (GenerationDelta, GenerationResult, ModelInfo, Prompt, SamplingParams,
                          chat_messages_proto, delta_from_proto, generate_request, results_by_index)
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc


class AsyncClient:
    def __init__(self, target: str = "localhost:50051", *, timeout_s: float | None = None,
                 channel: grpc.aio.Channel | None = None, tls_ca: TlsCa = None, token: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.channel = channel or aio_channel(target, CHANNEL_OPTIONS, tls_ca, token)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate_stream(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                              messages: Sequence[dict] | None = None, request_id: str = "",
                              timeout_s: float | None = None) -> AsyncIterator[GenerationDelta]:
        request = generate_request(prompt, params, messages=messages, request_id=request_id)
        call = self.stub.Generate(request, timeout=timeout_s if timeout_s is not None else self.timeout_s)
        try:
            async for pb in call:
                yield delta_from_proto(pb)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                       messages: Sequence[dict] | None = None, request_id: str = "",
                       timeout_s: float | None = None) -> GenerationResult:
        """One sample (sampling.n must be 1 or unset: generate_n returns several)."""
        if params is not None and params.n is not None and params.n > 1:
            raise ValueError(f"SamplingParams.n is {params.n}: use generate_n for several samples")
        result = GenerationResult()
        async for delta in self.generate_stream(prompt, params, messages=messages, request_id=request_id,
                                                timeout_s=timeout_s):
            result.add(delta)
        return result

    async def generate_n(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                       messages: Sequence[dict] | None = None, request_id: str = "",
                       timeout_s: float | None = None) -> list[GenerationResult]:
        """The params.n samples of one prompt, which share its KV blocks: one result per sample, by index."""
        deltas = [delta async for delta in self.generate_stream(prompt, params, messages=messages,
                                                              request_id=request_id, timeout_s=timeout_s)]
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
        try:
            return list((await self.stub.Tokenize(request, timeout=self.timeout_s)).token_ids)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def model_info(self) -> ModelInfo:
        try:
            return ModelInfo.from_proto(await self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                                                     timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
