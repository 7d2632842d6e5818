"""One request as the control plane sees it: its tokens, sampling options, KV blocks and batch slot.

The Scheduler moves a Sequence between WAITING and RUNNING and finishes it; the
BlockManager fills `block_table`; the plan builder reads the counters below to decide
what the data plane must be told this step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from proto.sampling_schema import options_dataclass, uses_penalties


class _SamplingOptionsMethods:
    """The user's sampling parameters, already validated by the API layer: one field per option of
    proto/sampling_schema.py, defaults filled in; max_tokens comes first (docs/sampling.md).
    structured_output is what validation read (a StructuredOutputSpec) until the servicer swaps in
    its compiled grammar (controlplane/structured/compiler.py); each sample gets its own matcher."""

    __slots__ = ()

    @property
    def uses_penalties(self) -> bool:
        return uses_penalties(self.__getattribute__)

    def for_sample(self, index: int) -> "SamplingOptions":
        """The options of sample `index` of n: its own seed stream; prompt logprobs come with sample 0 only."""
        if index == 0:
            return self
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return replace(self, seed=seed, prompt_logprobs=None)


SamplingOptions = options_dataclass("SamplingOptions", _SamplingOptionsMethods, unset_is_none=False, frozen=True,
                                    first=("max_tokens",))


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt, then generated tokens
    sampling: SamplingOptions
    num_prompt_tokens: int = -1  # -1: all of token_ids at construction
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # tokens whose KV is in the cache or is computed by the step being planned
    num_computed_tokens: int = 0
    # prefix-cache hit at first admission, for usage reporting
    num_cached_prompt_tokens: int = 0
    slot: int | None = None  # index in the data plane's persistent batch
    # the data plane sampled token_ids[-1] at the current slot, so a decode need not send it
    last_token_on_device: bool = False
    # tokens sampled by steps in flight (overlap), not yet in token_ids: the data plane holds
    # the newest at the slot, so the next decode needs no id; at most 2 (one step ahead)
    num_pending_tokens: int = 0
    num_blocks_sent: int = 0  # block-table entries the data plane holds for the current slot
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    arrival: int = -1  # admission order key, set by Scheduler.add (priority scheduling shifts it)
    priority: int = 0  # lower runs first (vLLM's meaning); used under --scheduling-policy priority
    request_id: str = ""  # empty: seq_id (a request of one sample)
    index: int = 0  # which of its request's n samples
    # sample 0 of the request when this is a later sample: the Scheduler admits it once the
    # leader's prompt is computed, so it shares the leader's full prompt blocks (prefix cache)
    leader: Sequence | None = None
    num_prompt_logprobs: int = 0  # prompt tokens whose logprobs came back (the first has none)
    stop_token_id: int | None = None  # the EOS or stop token id that finished it
    # the ids that stop it past min_tokens: sampling.stop_token_ids, and the EOS ids unless
    # ignore_eos (set by Scheduler.add, which knows the EOS ids)
    stop_ids: frozenset[int] = frozenset()
    # structured output's matcher (controlplane/structured/grammar_state.py), None when unconstrained
    grammar: object | None = None
    # speculative decoding (controlplane/core/speculative.py): the drafts of its step in flight, the moving
    # average of its acceptance, and how many more steps it decodes plainly after a low one
    spec_drafts: list[int] | None = None
    spec_acceptance: float = 1.0
    spec_backoff_steps: int = 0
    max_num_tokens: int = field(init=False)  # prompt + max_tokens: it stops by length there

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)  # ours to append to; the caller's list stays the prompt
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        self.request_id = self.request_id or self.seq_id
        self.max_num_tokens = self.num_prompt_tokens + self.sampling.max_tokens
        if self.sampling.structured_output is not None and self.grammar is None:
            self.grammar = self.sampling.structured_output.new_state()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens - 1


def new_samples(request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions) -> list[Sequence]:
    """The sampling.n sequences of one request: sample 0 is `request_id`, sample i `request_id#i`,
    led by sample 0 (the Scheduler admits them once its prompt blocks are in the prefix cache)."""
    samples: list[Sequence] = []
    for i in range(sampling.n):
        samples.append(Sequence(request_id if i == 0 else f"{request_id}#{i}", prompt_token_ids, sampling.for_sample(i),
                                request_id=request_id, index=i, leader=samples[0] if i else None))
    return samples
