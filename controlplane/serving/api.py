"""The public nanoplane.v1.Generation servicer: validate, convert, hand to the Engine, stream back.

Thin on purpose: the rules live in validation.py, the bounds in admission.py, the work
in engine.py; this module only maps between protobuf and those plain objects, and
errors to status codes.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import structlog

from controlplane.serving.admission import RETRY_AFTER_METADATA, AdmissionControl, Overloaded
from controlplane.serving.engine import Engine, EngineFailure, OutputStream, RequestOutput
from controlplane.serving.logprobs import PositionLogprobs
from controlplane.serving.tokenizer import Tokenizer
from controlplane.serving.validation import InvalidRequest, RequestLimits, chat_messages, validate_generate
from controlplane.structured.compiler import StructuredOutputCompiler
from controlplane.structured.spec import InvalidStructuredOutput, StructuredOutputUnavailable
from proto.nanoplane.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger("controlplane.serving.api")


def logprobs_proto(entries: list[PositionLogprobs] | None) -> list[generation_pb2.PositionLogprobs]:
    def token(t):
        return generation_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank)
    return [generation_pb2.PositionLogprobs(token=token(e.token), top=[token(t) for t in e.top]) for e in entries or ()]


def response_of(output: RequestOutput) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(request_id=output.request_id, text=output.text,
                                               token_ids=output.token_ids, index=output.index,
                                               logprobs=logprobs_proto(output.logprobs),
                                               prompt_logprobs=logprobs_proto(output.prompt_logprobs))
    if output.finish_reason is not None:
        response.finish_reason = output.finish_reason
        u = output.usage
        response.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=u.prompt_tokens,
                                                     completion_tokens=u.completion_tokens,
                                                     cached_prompt_tokens=u.cached_prompt_tokens))
    return response


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: RequestLimits, model_info: generation_pb2.ModelInfo,
                 admission: AdmissionControl, grammars: StructuredOutputCompiler | None = None):
        self.engine = engine
        self.grammars = grammars or StructuredOutputCompiler.for_tokenizer(tokenizer, limits.vocab_size,
                                                                           engine.scheduler.config.eos_token_ids)
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_info = model_info
        self.admission = admission

    async def Generate(self, request, context):
        try:
            validated = validate_generate(request, self.tokenizer, self.limits)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sampling = validated.sampling
        if validated.structured_output is not None:
            try:  # on the compile pool: this call waits, the engine and other calls go on
                compiled = await self.grammars.compile_async(validated.structured_output)
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
            self.engine.submit(request_id, validated.prompt_token_ids, sampling, stream)
            log.info("request accepted", request_id=request_id, prompt_tokens=len(validated.prompt_token_ids),
                     max_tokens=sampling.max_tokens)
            while True:
                output = await stream.get()
                if isinstance(output, EngineFailure):
                    finished = True
                    await context.abort(grpc.StatusCode[output.code], output.message)
                yield response_of(output)
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
            if kind == "prompt":
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = self.tokenizer.encode(request.prompt, add_special_tokens=add_special)
            elif kind == "messages":
                add_prompt = (request.messages.add_generation_prompt
                              if request.messages.HasField("add_generation_prompt") else True)
                ids = self.tokenizer.apply_chat_template(chat_messages(request.messages), add_generation_prompt=add_prompt)
            else:
                raise InvalidRequest("input", "set one of prompt or messages")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {e}")
        return generation_pb2.TokenizeResponse(token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def GetModelInfo(self, request, context):
        return self.model_info
