"""One request as the control plane sees it: its tokens, sampling options, KV blocks and batch slot.

The Scheduler moves a Sequence between WAITING and RUNNING and finishes it; the
BlockManager fills `block_table`; the plan builder reads the counters below to decide
what the data plane must be told this step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class SamplingOptions:
    """The user's sampling parameters, already validated by the API layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None


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
    num_blocks_sent: int = 0  # block-table entries the data plane holds for the current slot
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    arrival: int = -1  # admission order key, set by Scheduler.add

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)  # ours to append to; the caller's list stays the prompt
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

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
