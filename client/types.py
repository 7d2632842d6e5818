"""Plain result and parameter types of the client library, and their protobuf conversions."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence, Union

from proto.nanoplane.v1 import generation_pb2
from proto.sampling_schema import OPTIONS, WIRE_RANGE, options_dataclass

SAMPLING_OPTIONS = OPTIONS  # the table, for the client's own clients (the OpenAI gateway)

Prompt = Union[str, Sequence[int]]


class _SamplingParamsMethods:
    """Named as in vLLM; None leaves the server's default (vLLM's). docs/sampling.md says what each does;
    proto/sampling_schema.py declares them (one field each, in its order).

    n > 1 asks for n samples of the prompt: use Client.generate_n (or generate_stream,
    whose deltas carry their sample's `index`). structured_output takes a StructuredOutput
    (client/structured.py): a JSON schema, regex, grammar or choice the text must match."""

    __slots__ = ()

    def to_proto(self) -> generation_pb2.SamplingParams:
        pb = generation_pb2.SamplingParams()
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.repeated:
                getattr(pb, option.name).extend(value)
            elif option.wire == "oneof":
                if value is not None:  # structured_output: a client.StructuredOutput
                    value.fill(pb)
            elif value is not None:
                setattr(pb, option.name, value)
        return pb


SamplingParams = options_dataclass("SamplingParams", _SamplingParamsMethods, unset_is_none=True, frozen=False)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution (before penalties,
    temperature and filters); rank 1 is the most likely token."""

    token_id: int
    logprob: float
    rank: int
    token: str = ""  # the token's text (decoded alone)


@dataclass(frozen=True)
class PositionLogprobs:
    token: TokenLogprob  # the generated (or prompt) token at this position
    top: list[TokenLogprob]  # the most likely tokens there, most likely first


@dataclass(frozen=True)
class GenerationDelta:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort" on the sample's last delta
    usage: Usage | None = None
    index: int = 0  # which of the request's n samples
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # one per token id, when asked for
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)  # prompt tokens after the first
    # the first delta of a new attempt after UNAVAILABLE cut the call off (retry_partial): discard earlier deltas
    restarted: bool = False


@dataclass
class GenerationResult:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)

    def add(self, delta: GenerationDelta) -> None:
        if delta.restarted:
            self.__init__()
        self.request_id, self.index = delta.request_id, delta.index
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        if delta.finish_reason:
            self.finish_reason, self.usage = delta.finish_reason, delta.usage


def results_by_index(deltas) -> list[GenerationResult]:
    """Folds the deltas of a request of n samples into one result per sample, by index."""
    results: dict[int, GenerationResult] = {}
    for delta in deltas:
        if delta.restarted:
            results.clear()
        results.setdefault(delta.index, GenerationResult()).add(delta)
    return [results[i] for i in sorted(results)]


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    architecture: str
    max_model_len: int
    kv_capacity_tokens: int
    block_size: int
    num_kv_blocks: int
    vocab_size: int
    dtype: str
    device: str
    attention_backend: str
    max_num_seqs: int

    @classmethod
    def from_proto(cls, pb) -> "ModelInfo":
        return cls(**{f.name: getattr(pb, f.name) for f in fields(cls)})


def _logprobs_from_proto(entries) -> list[PositionLogprobs]:
    def token(t):
        return TokenLogprob(t.token_id, t.logprob, t.rank, t.token)
    return [PositionLogprobs(token(e.token), [token(t) for t in e.top]) for e in entries]


def delta_from_proto(pb: generation_pb2.GenerateResponse) -> GenerationDelta:
    usage = None
    if pb.finish_reason:
        u = pb.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return GenerationDelta(pb.request_id, pb.text, list(pb.token_ids), pb.finish_reason or None, usage, pb.index,
                           _logprobs_from_proto(pb.logprobs), _logprobs_from_proto(pb.prompt_logprobs))


def chat_messages_proto(messages: Sequence[dict], add_generation_prompt: bool = True) -> generation_pb2.ChatMessages:
    return generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        add_generation_prompt=add_generation_prompt)


def generate_request(prompt: Prompt | None = None, params: SamplingParams | None = None, *,
                     messages: Sequence[dict] | None = None, request_id: str = "") -> generation_pb2.GenerateRequest:
    pb = generation_pb2.GenerateRequest(sampling=(params or SamplingParams()).to_proto(), request_id=request_id)
    if messages is not None:
        pb.messages.CopyFrom(chat_messages_proto(messages))
    elif isinstance(prompt, str):
        pb.prompt = prompt
    elif prompt is not None:
        pb.prompt_token_ids.ids.extend(int(t) for t in prompt)
    else:
        raise ValueError("give a prompt (text or token ids) or chat messages")
    return pb
