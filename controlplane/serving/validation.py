"""Checks a GenerateRequest against the model's limits and turns it into plain data.

Every rejection is an InvalidRequest naming the field and the limit, so the
servicer can answer INVALID_ARGUMENT with a sentence the caller can act on.
"""
from __future__ import annotations

from dataclasses import dataclass

from controlplane.config import ControlPlaneConfig
from controlplane.core.sequence import SamplingOptions
from controlplane.serving.tokenizer import Tokenizer
from controlplane.structured.spec import InvalidStructuredOutput, check_compatible, spec_from_proto
from proto.sampling_schema import OPTIONS, check_value

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRING_CHARS = 512
MAX_REQUEST_ID_CHARS = 256  # it is echoed in every response and bound to every log line of the request


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(slots=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    max_logprobs: int = 20  # for logprobs and prompt_logprobs
    max_n: int = 16
    max_prompt_chars: int = ControlPlaneConfig.max_prompt_chars
    max_prompt_tokens: int = ControlPlaneConfig.max_prompt_tokens


@dataclass(slots=True)
class ValidatedRequest:
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    request_id: str = ""  # empty: the server makes one


def chat_messages(pb_messages) -> list[dict]:
    if not pb_messages.messages:
        raise InvalidRequest("messages", "at least one message is required")
    messages = []
    for i, m in enumerate(pb_messages.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"unknown role {m.role!r}; use one of {', '.join(CHAT_ROLES)}")
        messages.append({"role": m.role, "content": m.content})
    return messages


def check_prompt_size(request, limits: RequestLimits) -> None:
    """The bounds that hold before any tokenizing (cheap: lengths only), so a huge prompt costs nothing."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        num_chars = len(request.prompt)
    elif kind == "messages":
        num_chars = sum(len(m.content) for m in request.messages.messages)
    elif kind == "prompt_token_ids":
        if len(request.prompt_token_ids.ids) > limits.max_prompt_tokens:
            raise InvalidRequest("prompt_token_ids", f"{len(request.prompt_token_ids.ids)} tokens; the server "
                                                     f"takes at most {limits.max_prompt_tokens} (--max-prompt-tokens)")
        return
    else:
        return
    if num_chars > limits.max_prompt_chars:
        raise InvalidRequest(kind, f"{num_chars} characters; the server takes at most {limits.max_prompt_chars} "
                                   f"(--max-prompt-chars)")


def prompt_token_ids(request, tokenizer: Tokenizer, limits: RequestLimits) -> list[int]:
    check_prompt_size(request, limits)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "set one of prompt, prompt_token_ids or messages")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt", "the prompt is empty")
        ids = tokenizer.encode(request.prompt)
    elif kind == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_token_ids", "the prompt is empty")
        for i, t in enumerate(ids):
            if not 0 <= t < limits.vocab_size:
                raise InvalidRequest(f"prompt_token_ids[{i}]",
                                     f"token id {t} is outside the vocabulary [0, {limits.vocab_size})")
    else:
        add_prompt = request.messages.add_generation_prompt if request.messages.HasField("add_generation_prompt") else True
        try:
            ids = tokenizer.apply_chat_template(chat_messages(request.messages), add_generation_prompt=add_prompt)
        except InvalidRequest:
            raise
        except ValueError as e:
            raise InvalidRequest("messages", str(e)) from e
    if not ids:
        raise InvalidRequest(kind, "the prompt encodes to no tokens")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(kind, f"the prompt has {len(ids)} tokens; the server takes at most "
                                   f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
    return ids


def sampling_options(pb, num_prompt_tokens: int, limits: RequestLimits) -> SamplingOptions:
    """The request's options in table order (proto/sampling_schema.py), each checked against its limits."""
    values: dict = {}

    def limit_of(name: str):
        return values[name] if name in values else getattr(limits, name)

    for option in OPTIONS:
        if option.repeated:
            values[option.name] = _items(pb, option, limits)
        elif option.wire == "oneof":
            # structured_output: its StructuredOutputSpec, which the servicer compiles off the engine thread
            values[option.name] = _check(spec_from_proto, pb)
        elif option.name == "max_tokens":
            values["max_tokens"] = _max_tokens(pb, option, num_prompt_tokens, limits)
        elif option.optional and not pb.HasField(option.name):
            values[option.name] = option.default
        else:
            value = getattr(pb, option.name)
            problem = check_value(option, value, limit_of)
            if problem:
                raise InvalidRequest(f"sampling.{option.name}", problem)
            values[option.name] = value
    options = SamplingOptions(**values)
    if options.structured_output is not None:
        _check(check_compatible, options.structured_output, options)
    return options


def _check(check, *args):
    """check(*args), its InvalidStructuredOutput as an InvalidRequest."""
    try:
        return check(*args)
    except InvalidStructuredOutput as e:
        raise InvalidRequest(e.field, str(e).removeprefix(f"{e.field}: ")) from e


def _max_tokens(pb, option, num_prompt_tokens: int, limits: RequestLimits) -> int:
    """A sequence must fit the model length and, alone, the whole KV cache; unset, it may fill that room."""
    max_len = min(limits.max_model_len, limits.kv_capacity_tokens)
    room = max_len - num_prompt_tokens
    if not pb.HasField("max_tokens"):
        return room
    max_tokens = pb.max_tokens
    problem = check_value(option, max_tokens, None)
    if problem:
        raise InvalidRequest("sampling.max_tokens", problem)
    if max_tokens > room:
        limit = "the model's maximum length" if max_len == limits.max_model_len else "the KV cache's capacity"
        raise InvalidRequest("sampling.max_tokens",
                             f"{max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds {limit} of "
                             f"{max_len} tokens; ask for at most {room}")
    return max_tokens


def _items(pb, option, limits: RequestLimits) -> tuple:
    items = tuple(getattr(pb, option.name))
    what = "stop strings" if option.wire == "string" else "ids"
    if len(items) > option.max_items:
        raise InvalidRequest(f"sampling.{option.name}", f"at most {option.max_items} {what}, got {len(items)}")
    for i, item in enumerate(items):
        if option.wire == "string" and (not item or len(item) > MAX_STOP_STRING_CHARS):
            raise InvalidRequest(f"sampling.{option.name}[{i}]",
                                 f"must be 1 to {MAX_STOP_STRING_CHARS} characters long")
        if option.wire != "string" and not 0 <= item < limits.vocab_size:
            raise InvalidRequest(f"sampling.{option.name}[{i}]",
                                 f"token id {item} is outside the vocabulary [0, {limits.vocab_size})")
    return items


def request_id(request) -> str:
    rid = request.request_id
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(rid)}")
    if not rid.isprintable():
        raise InvalidRequest("request_id", "only printable characters: no newlines, tabs or control characters")
    return rid


def validate_generate(request, tokenizer: Tokenizer, limits: RequestLimits) -> ValidatedRequest:
    rid = request_id(request)
    ids = prompt_token_ids(request, tokenizer, limits)
    if len(ids) >= limits.max_model_len:
        raise InvalidRequest(request.WhichOneof("input"),
                             f"the prompt has {len(ids)} tokens; the model's maximum length is "
                             f"{limits.max_model_len} tokens including at least one generated token")
    if len(ids) + 1 > limits.kv_capacity_tokens:
        raise InvalidRequest(request.WhichOneof("input"),
                             f"the prompt has {len(ids)} tokens but the whole KV cache holds "
                             f"{limits.kv_capacity_tokens}; shorten the prompt")
    return ValidatedRequest(ids, sampling_options(request.sampling, len(ids), limits), rid)
