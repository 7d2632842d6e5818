"""How the serving benchmark sends one request and times it: over gRPC (AsyncClient) or over the
OpenAI-compatible HTTP gateway (a small asyncio SSE client, so the benchmark needs no HTTP library).

Each backend's `send(request)` returns a RequestRecord: when the first text arrived
(TTFT), when the last did (end-to-end latency), and how many tokens were generated.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from client import AsyncClient, NanoplaneError, SamplingParams


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (NaN for a one-token output)."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else float("nan")


class GrpcBackend:
    """Must be made inside the event loop that sends (a grpc.aio channel belongs to its loop)."""

    def __init__(self, target: str):
        self.client = AsyncClient(target)

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(len(request.prompt_token_ids))
        params = SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens, ignore_eos=True)
        start = time.perf_counter()
        try:
            async for delta in self.client.generate_stream(request.prompt_token_ids, params):
                if delta.token_ids and record.output_tokens == 0:
                    record.ttft_s = time.perf_counter() - start
                record.output_tokens += len(delta.token_ids)
        except NanoplaneError as e:
            record.error = str(e)
        record.e2e_s = time.perf_counter() - start
        return record

    async def close(self) -> None:
        await self.client.close()


class HttpBackend:
    """POST /v1/completions with stream and include_usage; one connection per request, as a user would."""

    def __init__(self, base_url: str):
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"--http-url must be http://HOST:PORT[/v1], got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.path = (url.path if url.path.endswith("/v1") else url.path + "/v1") + "/completions"

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(len(request.prompt_token_ids))
        body = json.dumps({"prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
                           "temperature": request.temperature, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        start = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            status = (await reader.readline()).decode("latin-1").split(" ", 2)
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers
            if len(status) < 2 or status[1] != "200":
                record.error = f"HTTP {' '.join(status[1:]).strip()}: {(await reader.read()).decode()[:300]}"
                return record
            async for event in _sse_events(reader):
                if "error" in event:
                    record.error = event["error"].get("message", str(event))
                elif event.get("choices") and event["choices"][0].get("text") and record.ttft_s != record.ttft_s:
                    record.ttft_s = time.perf_counter() - start  # NaN != NaN: the first text
                elif event.get("usage"):
                    record.output_tokens = event["usage"]["completion_tokens"]
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            record.error = f"{type(e).__name__}: {e}"
        finally:
            record.e2e_s = time.perf_counter() - start
            if writer is not None:
                writer.close()
        return record

    async def close(self) -> None:
        pass


async def _sse_events(reader: asyncio.StreamReader):
    while line := await reader.readline():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
