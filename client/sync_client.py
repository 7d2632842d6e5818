"""Client: the blocking client of the nanoplane Generation API."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Sequence, TypeVar

import grpc

from client.credentials import TlsCa, sync_channel
from client.errors import from_rpc_error
from client.retry import RetryPolicy, deadline_of, time_left
from client.types import (GenerationDelta, GenerationResult, ModelInfo, Prompt, SamplingParams,
                          chat_messages_proto, delta_from_proto, generate_request, results_by_index)
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 2**20), ("grpc.max_send_message_length", 16 * 2**20),
                   ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]


class Client:
    """`Client("localhost:50051").generate("Hello")`. `timeout_s` bounds each call (None = no limit);
    `tls_ca` (a CA file, PEM bytes, or True for default roots) turns TLS on; `token` is the bearer token.
    A call that fails with UNAVAILABLE is made again up to `retries` times, after `backoff_s`, then
    twice that, ...; a generation that already streamed tokens only with `retry_partial` (client/retry.py)."""

    def __init__(self, target: str = "localhost:50051", *, timeout_s: float | None = None,
                 channel: grpc.Channel | None = None, tls_ca: TlsCa = None, token: str | None = None,
                 retries: int = 3, backoff_s: float = 0.2, retry_partial: bool = False):
        self.target = target
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries, backoff_s, retry_partial)
        self.channel = channel or sync_channel(target, CHANNEL_OPTIONS, tls_ca, token)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s if timeout_s is not None else self.timeout_s

    def _unary(self, call: Callable[[float | None], T]) -> T:
        """call(timeout) with retries on UNAVAILABLE, all within this client's timeout."""
        deadline = deadline_of(self.timeout_s)
        attempt = 0
        while True:
            try:
                return call(time_left(deadline))
            except grpc.RpcError as e:
                delay = self.retry.next_delay_s(e, attempt, False, deadline)
                if delay is None:
                    raise from_rpc_error(e) from None
            time.sleep(delay)
            attempt += 1

    def generate_stream(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                        messages: Sequence[dict] | None = None, request_id: str = "",
                        timeout_s: float | None = None, retry_partial: bool | None = None) -> Iterator[GenerationDelta]:
        """Yields text/token deltas as they are generated; the last has finish_reason and usage.
        Closing the iterator early cancels the request on the server. With retry_partial (default:
        the client's), a generation cut off by UNAVAILABLE starts over: its next delta has restarted=True."""
        request = generate_request(prompt, params, messages=messages, request_id=request_id)
        deadline = deadline_of(self._timeout(timeout_s))
        produced = False
        attempt = 0
        while True:
            call = self.stub.Generate(request, timeout=time_left(deadline))
            restarted = produced
            try:
                for pb in call:
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
            time.sleep(delay)
            attempt += 1

    def generate(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                 messages: Sequence[dict] | None = None, request_id: str = "",
                 timeout_s: float | None = None, retry_partial: bool | None = None) -> GenerationResult:
        """One sample (sampling.n must be 1 or unset: generate_n returns several)."""
        if params is not None and params.n is not None and params.n > 1:
            raise ValueError(f"SamplingParams.n is {params.n}: use generate_n for several samples")
        result = GenerationResult()
        for delta in self.generate_stream(prompt, params, messages=messages, request_id=request_id,
                                          timeout_s=timeout_s, retry_partial=retry_partial):
            result.add(delta)
        return result

    def generate_n(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                   messages: Sequence[dict] | None = None, request_id: str = "",
                   timeout_s: float | None = None, retry_partial: bool | None = None) -> list[GenerationResult]:
        """The params.n samples of one prompt, which share its KV blocks: one result per sample, by index."""
        return results_by_index(self.generate_stream(prompt, params, messages=messages, request_id=request_id,
                                                     timeout_s=timeout_s, retry_partial=retry_partial))

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, *,
             timeout_s: float | None = None) -> GenerationResult:
        return self.generate(params=params, messages=messages, timeout_s=timeout_s)

    def chat_stream(self, messages: Sequence[dict], params: SamplingParams | None = None, *,
                    timeout_s: float | None = None) -> Iterator[GenerationDelta]:
        return self.generate_stream(params=params, messages=messages, timeout_s=timeout_s)

    def tokenize(self, text: str | None = None, *, messages: Sequence[dict] | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        request = generation_pb2.TokenizeRequest(add_special_tokens=add_special_tokens)
        if messages is not None:
            request.messages.CopyFrom(chat_messages_proto(messages))
        else:
            request.prompt = text or ""
        return list(self._unary(lambda timeout: self.stub.Tokenize(request, timeout=timeout)).token_ids)

    def model_info(self) -> ModelInfo:
        return ModelInfo.from_proto(self._unary(
            lambda timeout: self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout)))
