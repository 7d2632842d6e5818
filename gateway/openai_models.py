"""OpenAI's request and response bodies as pydantic models: what the gateway checks bodies against, and what
its OpenAPI schema (/openapi.json, /docs) shows.

Requests are strict (a string is not a number, 1 is not true) and keep fields they do not
name, as OpenAI's own server ignores them. A body that fits its model is then read by
openai_protocol.py, which checks what types cannot say (non-empty prompts, fields not
supported yet) and maps it to SamplingParams; the server checks the numbers against the
model's limits. Responses are built as plain dicts (openai_responses.py) and checked
against these models on their way out; stream chunks are documented here, not checked.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# what a field of several shapes accepts: its schema description and its error message (when no shape fits)
SHAPES = {
    "prompt": "a string, a non-empty list of strings, or non-empty lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = None


class _Sampling(_Request):
    """Fields both endpoints take: OpenAI's and vLLM's extra sampling fields."""
    model: str | None = Field(None, description="the served model's name (GET /v1/models); empty = that one")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(None, description="completions per prompt")
    stream: bool | None = Field(None, description="answer with server-sent events, ending in `data: [DONE]`")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=SHAPES["stop"])
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported yet (only empty)")
    top_k: int | None = Field(None, description="vLLM's: sample among the k likeliest tokens (-1 = all)")
    min_p: float | None = Field(None, description="vLLM's: drop tokens less likely than min_p x the likeliest")
    repetition_penalty: float | None = Field(None, description="vLLM's")
    min_tokens: int | None = Field(None, description="vLLM's: no stop before this many tokens")
    stop_token_ids: list[int] | None = Field(None, description="vLLM's")
    ignore_eos: bool | None = Field(None, description="vLLM's: go on past the end-of-sequence token")
    skip_special_tokens: bool | None = Field(None, description="vLLM's")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM's")
    # structured output (gateway/structured_output.py): at most one of these
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"name": ..., "schema": {...}}}: the output is JSON of that schema')
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema the output matches")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression the whole output matches")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's: an EBNF grammar (start rule `root`)")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=SHAPES["prompt"])
    logprobs: int | None = Field(None, description="also return this many top logprobs per token")
    echo: bool | None = Field(None, description="not supported yet (only false)")
    best_of: int | None = Field(None, description="not supported yet (only 1)")
    suffix: str | None = Field(None, description="not supported yet (only empty)")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str = Field(description="system (or developer), user or assistant")
    content: str | list[TextPart] | None = Field(None, description=SHAPES["content"])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="return each token's logprob")
    top_logprobs: int | None = Field(None, description="with logprobs: also this many top ones per token")
    tools: list[Any] | None = Field(None, description="not supported yet (only empty)")
    functions: list[Any] | None = Field(None, description="not supported yet (only empty)")


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="each token's text (`token_id:N` when the server sends none)")
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    """The body of POST /v1/completions; with stream: true, chunks of this shape as server-sent events."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of POST /v1/chat/completions with stream: true."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage: null but on the last chunk")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


class Status(BaseModel):
    status: str
