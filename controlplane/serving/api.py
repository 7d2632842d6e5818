"""The public nanoplane.v1.Generation servicer: validate, convert, hand to the Engine, stream back.

Thin on purpose: the rules live in validation.py, the bounds in admission.py, the work
in engine.py; this module only maps between protobuf and those plain objects, and
errors to status codes. Validation, which tokenizes, runs on `tokenize_pool` (its
--tokenizer-workers threads bound how many prompts are tokenized at once; the tokenizers
library releases the GIL), never on the event loop that streams every other caller's tokens;
a prompt over --max-prompt-chars is refused on the loop before any of that. A structured-output
constraint is compiled on the grammar compiler's own threads (controlplane/structured/compiler.py).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import structlog

from controlplane.serving.admin import status_proto
from controlplane.serving.admission import RETRY_AFTER_METADATA, AdmissionControl, Overloaded
from controlplane.serving.engine import Engine, EngineFailure, OutputStream, RequestOutput
from controlplane.serving.logprobs import PositionLogprobs
from controlplane.serving.tokenizer import Tokenizer
from controlplane.serving.validation import (InvalidRequest, RequestLimits, chat_messages, check_prompt_size,
                                             validate_generate)
from controlplane.structured.compiler import StructuredOutputCompiler
from controlplane.structured.spec import InvalidStructuredOutput, StructuredOutputUnavailable
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger("controlplane.serving.api")


def logprobs_proto(entries: list[PositionLogprobs] | None,
                   tokenizer: Tokenizer) -> list[generation_pb2.PositionLogprobs]:
    if not entries:
        return []
    ids = sorted({t.token_id for e in entries for t in (e.token, *e.top)})
    text_of = dict(zip(ids, tokenizer.decode_batch([[i] for i in ids])))

    def token(t):
        return generation_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank,
                                           token=text_of[t.token_id])
    return [generation_pb2.PositionLogprobs(token=token(e.token), top=[token(t) for t in e.top]) for e in entries]


def response_of(output: RequestOutput, tokenizer: Tokenizer) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(request_id=output.request_id, text=output.text,
                                               token_ids=output.token_ids, index=output.index,
                                               logprobs=logprobs_proto(output.logprobs, tokenizer),
                                               prompt_logprobs=logprobs_proto(output.prompt_logprobs, tokenizer))
    if output.finish_reason is not None:
        response.finish_reason = output.finish_reason
        u = output.usage
        response.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=u.prompt_tokens,
                                                     completion_tokens=u.completion_tokens,
                                                     cached_prompt_tokens=u.cached_prompt_tokens))
    return response


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: RequestLimits, model_info: generation_pb2.ModelInfo,
                 admission: AdmissionControl, tokenize_pool: ThreadPoolExecutor, grammars: StructuredOutputCompiler,
                 priority_enabled: bool = False):
        self.engine = engine  # an Engine, or the Router over several (the same interface)
        self.priority_enabled = priority_enabled
        self.grammars = grammars  # structured output's compiler and its cache
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_info = model_info
        self.admission = admission
        self.tokenize_pool = tokenize_pool

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    async def Generate(self, request, context):
        try:
            check_prompt_size(request, self.limits)
            validated = await self._off_loop(validate_generate, request, self.tokenizer, self.limits)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.priority and not self.priority_enabled:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "priority: this server schedules first come, "
                                "first served; send priority 0, or start it with --scheduling-policy priority")
        sampling = validated.sampling
        if sampling.structured_output is not None:
            try:  # on the compile pool: this call waits, the engine and other calls go on
                compiled = await self.grammars.compile_async(sampling.structured_output)
            except InvalidStructuredOutput as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except StructuredOutputUnavailable as e:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
            sampling = replace(sampling, structured_output=compiled)
        num_tokens = len(validated.prompt_token_ids) + sampling.max_tokens * sampling.n
        try:
            self.admission.admit(num_tokens)
        except Overloaded as e:
            log.warning("request refused: overloaded", reason=str(e))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                                trailing_metadata=((RETRY_AFTER_METADATA, str(e.retry_after_ms)),))
        request_id = validated.request_id or self.engine.new_request_id()
        structlog.contextvars.bind_contextvars(request_id=request_id)  # on every log line of this call (its own task)
        finished = False
        num_unfinished = sampling.n  # each sample ends with its own finish_reason
        try:
            stream = OutputStream(asyncio.get_running_loop())
            self.engine.submit(request_id, validated.prompt_token_ids, sampling, stream, request.priority)
            log.info("request accepted", request_id=request_id, prompt_tokens=len(validated.prompt_token_ids),
                     max_tokens=sampling.max_tokens)
            while True:
                output = await stream.get()
                if isinstance(output, EngineFailure):
                    finished = True
                    await context.abort(grpc.StatusCode[output.code], output.message)
                yield response_of(output, self.tokenizer)
                if output.finish_reason is not None:
                    num_unfinished -= 1
                    log.info("request finished" if not num_unfinished else "sample finished", request_id=request_id,
                             index=output.index, finish_reason=output.finish_reason,
                             completion_tokens=output.usage.completion_tokens)
                    if not num_unfinished:
                        finished = True
                        return
        finally:
            self.admission.release(num_tokens)
            if not finished:  # cancelled by the client, or its deadline passed
                self.engine.abort(request_id)
                log.info("request cancelled", request_id=request_id)

    async def Tokenize(self, request, context):
        kind = request.WhichOneof("input")
        try:
            check_prompt_size(request, self.limits)
            if kind == "prompt":
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = await self._off_loop(self.tokenizer.encode, request.prompt, add_special)
            elif kind == "messages":
                add_prompt = (request.messages.add_generation_prompt
                              if request.messages.HasField("add_generation_prompt") else True)
                ids = await self._off_loop(self.tokenizer.apply_chat_template, chat_messages(request.messages),
                                           add_prompt)
            else:
                raise InvalidRequest("input", "set one of prompt or messages")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {e}")
        return generation_pb2.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def GetModelInfo(self, request, context):
        states = getattr(self.engine, "states", None)
        if states is None:
            return self.model_info
        info = generation_pb2.ModelInfo()
        info.CopyFrom(self.model_info)
        info.dataplanes.extend(status_proto(s) for s in states())
        return info
