"""Checks a GenerateRequest against the model's limits and turns it into plain data.

Every rejection is an InvalidRequest naming the field and the limit, so the
servicer can answer INVALID_ARGUMENT with a sentence the caller can act on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from controlplane.core.sequence import SamplingOptions
from controlplane.serving.tokenizer import Tokenizer
from controlplane.structured.spec import InvalidStructuredOutput, StructuredOutputSpec, check_compatible, spec_from_proto

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_REQUEST_ID_CHARS = 256  # it is echoed in every response and bound to every log line of the request
INT64_MAX = 2**63 - 1


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


@dataclass(slots=True)
class ValidatedRequest:
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    request_id: str = ""  # empty: the server makes one
    structured_output: StructuredOutputSpec | None = None  # compiled by the servicer, off the engine thread


def chat_messages(pb_messages) -> list[dict]:
    if not pb_messages.messages:
        raise InvalidRequest("messages", "at least one message is required")
    messages = []
    for i, m in enumerate(pb_messages.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"unknown role {m.role!r}; use one of {', '.join(CHAT_ROLES)}")
        messages.append({"role": m.role, "content": m.content})
    return messages


def prompt_token_ids(request, tokenizer: Tokenizer, limits: RequestLimits) -> list[int]:
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
    return ids


def sampling_options(pb, num_prompt_tokens: int, limits: RequestLimits) -> SamplingOptions:
    temperature = pb.temperature if pb.HasField("temperature") else 1.0
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = pb.top_p if pb.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = pb.top_k if pb.HasField("top_k") else -1
    if top_k < -1 or top_k == 0:
        raise InvalidRequest("sampling.top_k", f"must be -1 (disabled) or at least 1, got {top_k}")
    # a sequence must fit the model length and, alone, the whole KV cache
    max_len = min(limits.max_model_len, limits.kv_capacity_tokens)
    room = max_len - num_prompt_tokens
    if pb.HasField("max_tokens"):
        max_tokens = pb.max_tokens
        if max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be at least 1, got {max_tokens}")
        if max_tokens > room:
            limit = ("the model's maximum length" if max_len == limits.max_model_len
                     else "the KV cache's capacity")
            raise InvalidRequest("sampling.max_tokens",
                                 f"{max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds {limit} of "
                                 f"{max_len} tokens; ask for at most {room}")
    else:
        max_tokens = room
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(pb.stop)}")
    for i, s in enumerate(pb.stop):
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest(f"sampling.stop[{i}]", f"must be 1 to {MAX_STOP_STRING_CHARS} characters long")
    if len(pb.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(pb.stop_token_ids)}")
    for i, t in enumerate(pb.stop_token_ids):
        if not 0 <= t < limits.vocab_size:
            raise InvalidRequest(f"sampling.stop_token_ids[{i}]",
                                 f"token id {t} is outside the vocabulary [0, {limits.vocab_size})")
    seed = pb.seed if pb.HasField("seed") else None
    if seed is not None and seed < 0:
        raise InvalidRequest("sampling.seed", f"must be >= 0, got {seed}")
    return SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                           stop=tuple(pb.stop), stop_token_ids=tuple(pb.stop_token_ids),
                           ignore_eos=pb.ignore_eos, seed=seed, **more_sampling_options(pb, max_tokens, limits))


def _float(pb, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = getattr(pb, name) if pb.HasField(name) else default
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
        raise InvalidRequest(f"sampling.{name}", f"must be a finite number in {interval}, got {value}")
    return value


def _count(pb, name: str, low: int, high: int, what: str) -> int | None:
    if not pb.HasField(name):
        return None
    value = getattr(pb, name)
    if not low <= value <= high:
        raise InvalidRequest(f"sampling.{name}", f"must be {low} to {high} ({what}), got {value}")
    return value


def more_sampling_options(pb, max_tokens: int, limits: RequestLimits) -> dict:
    """min-p, penalties, logprobs, n, min_tokens and the text options (docs/sampling.md)."""
    n = _count(pb, "n", 1, limits.max_n, "the server's --max-n")
    min_tokens = _count(pb, "min_tokens", 0, max_tokens, "at most max_tokens")
    return dict(
        min_p=_float(pb, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_float(pb, "repetition_penalty", 1.0, 0.0, math.inf, low_open=True),
        presence_penalty=_float(pb, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(pb, "frequency_penalty", 0.0, -2.0, 2.0),
        logprobs=_count(pb, "logprobs", 0, limits.max_logprobs, "the server's --max-logprobs"),
        prompt_logprobs=_count(pb, "prompt_logprobs", 0, limits.max_logprobs, "the server's --max-logprobs"),
        n=1 if n is None else n,
        min_tokens=min_tokens or 0,
        skip_special_tokens=pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True,
        include_stop_str_in_output=pb.include_stop_str_in_output,
    )


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
    sampling = sampling_options(request.sampling, len(ids), limits)
    try:
        spec = spec_from_proto(request.sampling)
        if spec is not None:
            check_compatible(spec, sampling)
    except InvalidStructuredOutput as e:
        raise InvalidRequest(e.field, str(e).removeprefix(f"{e.field}: ")) from e
    return ValidatedRequest(ids, sampling, rid, spec)
