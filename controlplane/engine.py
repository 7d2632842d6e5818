"""Engine: the control plane's step loop, on its own thread.

Each step: take in new requests and aborts → Scheduler.schedule() → the data plane
runs the plan → Scheduler.postprocess() appends sampled tokens → detokenise, check
stop strings, stream deltas to each request's OutputStream. Only this thread touches
the scheduler and sequences; the gRPC servicer talks to it through submit()/abort().
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass

import structlog

from controlplane.dataplane_client import DataPlaneClient, DataPlaneUnavailable
from controlplane.detokenizer import IncrementalDetokenizer
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, SamplingOptions, Sequence
from controlplane.tokenizer import Tokenizer

log = structlog.get_logger("controlplane.engine")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(slots=True)
class RequestOutput:
    """One streamed delta of a request; the last one has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class EngineFailure:
    """Delivered instead of a RequestOutput when the request cannot go on."""

    message: str


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


@dataclass(slots=True)
class _Request:
    seq: Sequence
    stream: OutputStream
    detokenizer: IncrementalDetokenizer
    arrival_s: float


class Engine:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, dataplane: DataPlaneClient):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.dataplane = dataplane
        self._inbox: queue.Queue = queue.Queue()
        self._wakeup = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.num_steps = 0

    # --- called from other threads -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout_s)
        self.dataplane.close_stream()

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}-{time.time_ns() % 10**9:09d}"

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions,
               stream: OutputStream) -> None:
        self._inbox.put(("add", request_id, prompt_token_ids, sampling, stream))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # --- the engine thread -------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, prompt_ids, sampling, stream = item
                if request_id in self._requests:
                    stream.put(EngineFailure(f"request id {request_id!r} is already in use"))
                    continue
                seq = Sequence(request_id, prompt_ids, sampling)
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, stop=sampling.stop)
                self._requests[request_id] = _Request(seq, stream, detok, time.monotonic())
                self.scheduler.add(seq)
            else:
                # the caller is gone (cancelled or deadline): free the blocks, tell no one
                if self._requests.pop(item[1], None) is not None:
                    self.scheduler.abort(item[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.scheduler.has_unfinished():
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except DataPlaneUnavailable as e:
                self._fail_all(str(e))
                time.sleep(0.5)
            except Exception as e:  # a bug must not leave clients hanging
                log.exception("engine step failed")
                self._fail_all(f"internal error in the control plane: {e}")

    def step(self) -> None:
        plan = self.scheduler.schedule()
        if plan is None:
            self._wakeup.wait(0.01)
            self._wakeup.clear()
            return
        result = self.dataplane.step(plan)
        self.num_steps += 1
        new_tokens: dict[str, list[int]] = {}
        for seq, token in self.scheduler.postprocess(plan, result):
            new_tokens.setdefault(seq.seq_id, []).append(token)
        for request_id, tokens in new_tokens.items():
            request = self._requests.get(request_id)
            if request is None:
                continue
            delta = request.detokenizer.add(tokens)
            seq = request.seq
            if delta.stopped and seq.finish_reason is None:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.finish_reason is not None:
                text = delta.text if delta.stopped else delta.text + request.detokenizer.finish()
                request.stream.put(RequestOutput(request_id, text, tokens, str(seq.finish_reason.value),
                                                 self._usage(seq)))
                del self._requests[request_id]
            elif delta.text or tokens:
                request.stream.put(RequestOutput(request_id, delta.text, tokens))

    def _usage(self, seq: Sequence) -> Usage:
        return Usage(seq.num_prompt_tokens, seq.num_completion_tokens, seq.num_cached_prompt_tokens)

    def _fail_all(self, message: str) -> None:
        log.error("failing all requests", reason=message, num_requests=len(self._requests))
        for request_id, request in list(self._requests.items()):
            self.scheduler.abort(request_id)
            request.stream.put(EngineFailure(message))
        self._requests.clear()
        self.dataplane.close_stream()
