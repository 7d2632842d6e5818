"""What the Engine hands back to the API: each request's deltas (RequestOutput) or its failure, on an OutputStream
that carries them from the engine thread to the asyncio task serving the request."""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass

from controlplane.serving.logprobs import PositionLogprobs


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(slots=True)
class RequestOutput:
    """One streamed delta of a request's sample; the sample's last one has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0  # which of the request's n samples
    logprobs: list[PositionLogprobs] | None = None  # one per token id, when asked for
    prompt_logprobs: list[PositionLogprobs] | None = None  # on sample 0's first delta(s), when asked for


@dataclass(slots=True)
class EngineFailure:
    """Delivered instead of a RequestOutput when the request cannot go on."""

    message: str
    code: str = "UNAVAILABLE"  # the name of the grpc.StatusCode the API answers with


class OutputStream:
    """Carries a request's outputs from the engine thread to the asyncio task serving it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, item: RequestOutput | EngineFailure) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put_nowait(item)

    async def get(self) -> RequestOutput | EngineFailure:
        return await self._queue.get()

    def get_blocking(self, timeout: float | None = None) -> RequestOutput | EngineFailure:
        return self._queue.get(timeout=timeout)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class Deliveries:
    """Outputs held until flush(), then handed to each event loop with one call_soon_threadsafe (a
    wake-up of the loop's thread each) instead of one per output: a step of 256 sequences costs one."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}

    def put(self, stream: OutputStream, item: RequestOutput) -> None:
        loop = stream._loop
        if loop is None:
            stream.put(item)
        elif (items := self._by_loop.get(loop)) is not None:
            items.append((stream._queue, item))
        else:
            self._by_loop[loop] = [(stream._queue, item)]

    def flush(self) -> None:
        for loop, items in self._by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)
        self._by_loop.clear()
