"""OpenAI's requests for the HTTP gateway: parse and check /v1/completions and /v1/chat/completions bodies.

A body becomes a plain GenerationJob (prompts, SamplingParams, streaming options) or
an OpenAIError in OpenAI's error shape. Only types and shapes are checked here; the
server checks the numbers against the model's limits, and its INVALID_ARGUMENT
message comes back as a 400 naming the OpenAI parameter (`error_of`). vLLM's
extra sampling fields are accepted too: stop_token_ids and every option that
proto/sampling_schema.py marks `openai` (top_k, penalties, min_tokens, ...); response_format
and vLLM's guided_* fields become structured_output (structured_output.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from client import NanoplaneError, SamplingParams
from client.types import SAMPLING_OPTIONS, WIRE_RANGE
from gateway.structured_output import StructuredOutputError, structured_output_of

INT32_MAX = WIRE_RANGE["int32"][1]

MAX_CHOICES = 128  # prompts x n of one HTTP request
UNSUPPORTED = {  # fields that would change the output, with the values that mean "off"
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "tools": (None, []), "functions": (None, []),
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationJob:
    chat: bool
    model: str | None
    prompts: list  # completions: a string or token ids each; chat: one list of messages
    params: SamplingParams  # params.n samples of each prompt (the server seeds sample i with seed + i)
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool  # return each token's logprob (and params.logprobs top ones)


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _bad(name, f"must be a number, got {json.dumps(value)}")
    return value


def _int(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {value}")
    return value


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {json.dumps(value)}")
    return value


_OPENAI_READERS = {
    "float": lambda body, option: _number(body, option.name),
    "int32": lambda body, option: _int(body, option.name, *WIRE_RANGE["int32"]),
    "int64": lambda body, option: _int(body, option.name, *WIRE_RANGE["int64"]),
    "bool": lambda body, option: _bool(body, option.name),
}


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT32_MAX


def _token_ids(value, name: str) -> list[int]:
    if not value or not all(_is_token_id(t) for t in value):
        raise _bad(name, "must be a string, a non-empty list of strings, or non-empty lists of token ids "
                         f"(integers in [0, {INT32_MAX}])")
    return value


def parse_prompts(value) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _bad("prompt", "must be a string, a non-empty list of strings, or non-empty lists of token ids")
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(isinstance(p, list) for p in value):
        return [_token_ids(p, "prompt") for p in value]
    return [_token_ids(value, "prompt")]


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\"}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a string role")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for system
        messages.append({"role": role, "content": _content(m, i)})
    return messages


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise _bad("stop", "must be a string or a list of strings")


def _logprobs(body: dict, chat: bool) -> int | None:
    """The number of top logprobs per token (0 = the sampled token's only), or None for none."""
    if not chat:
        return _int(body, "logprobs", 0, INT32_MAX)
    top = _int(body, "top_logprobs", 0, INT32_MAX)
    if not _bool(body, "logprobs"):
        if top is not None:
            raise _bad("top_logprobs", "needs logprobs: true")
        return None
    return top or 0


def _sampling(body: dict, chat: bool, n: int) -> SamplingParams:
    max_tokens_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _int(body, max_tokens_name, 1, INT32_MAX)
    if max_tokens is None and not chat:
        max_tokens = 16  # OpenAI's default for completions; chat's is the room the model length leaves
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(_is_token_id(t) for t in stop_token_ids):
        raise _bad("stop_token_ids", "must be a list of token ids")
    # the fields OpenAI (or vLLM) names as we do: their types here, their limits at the server
    same = {o.name: _OPENAI_READERS[o.wire](body, o) for o in SAMPLING_OPTIONS if o.openai}
    same = {name: value for name, value in same.items() if value is not None}  # None: the default
    return SamplingParams(**same, max_tokens=max_tokens, stop=_stop(body), stop_token_ids=stop_token_ids,
                          logprobs=_logprobs(body, chat), n=n if n > 1 else None)


def _job(body: dict, prompts: list, *, chat: bool) -> GenerationJob:
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in off:
            raise OpenAIError(400, f"{name} is not supported yet", param=name, code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string")
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    if n * len(prompts) > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} completions in one request")
    stream = bool(_bool(body, "stream"))
    stream_options = body.get("stream_options")
    if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
        raise _bad("stream_options", "is an object, allowed only with stream: true")
    include_usage = _bool(stream_options or {}, "include_usage")
    params = _sampling(body, chat, n)
    try:
        params.structured_output = structured_output_of(body)
    except StructuredOutputError as e:
        raise _bad(e.param, str(e).removeprefix(f"{e.param}: ")) from e
    return GenerationJob(chat, model, prompts, params, n, stream, bool(include_usage), params.logprobs is not None)


def parse_completion_request(body: dict) -> GenerationJob:
    if "prompt" not in body:
        raise _bad("prompt", "is required")
    return _job(body, parse_prompts(body["prompt"]), chat=False)


def parse_chat_request(body: dict) -> GenerationJob:
    if "messages" not in body:
        raise _bad("messages", "is required")
    return _job(body, [parse_messages(body["messages"])], chat=True)


_STATUS_OF_CODE = {  # gRPC status name -> (HTTP status, OpenAI error type)
    "INVALID_ARGUMENT": (400, "invalid_request_error"), "OUT_OF_RANGE": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "server_error"), "DEADLINE_EXCEEDED": (504, "server_error"),
}
_PARAM_OF_FIELD = {"prompt_token_ids": "prompt", "input": None, "logprobs": "logprobs",
                   "json_schema": "response_format", "json_object": "response_format", "regex": "guided_regex",
                   "choice": "guided_choice", "grammar": "guided_grammar"}


def error_of(e: NanoplaneError, chat: bool = False) -> OpenAIError:
    """The server's messages start with the field ("sampling.max_tokens: ..."); that names OpenAI's param."""
    status, kind = _STATUS_OF_CODE.get(e.code.name, (500, "server_error"))
    field = e.message.split(":", 1)[0] if ":" in e.message else ""
    param = None
    if status == 400 and field:
        base = re.split(r"[.\[]", field.removeprefix("sampling."))[0]  # messages[0].role -> messages
        param = _PARAM_OF_FIELD.get(base, base)
        if chat and param == "logprobs":
            param = "top_logprobs"
    return OpenAIError(status, e.message, type=kind, param=param, code=e.code.name.lower())
