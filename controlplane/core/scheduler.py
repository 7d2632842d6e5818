"""Decides each step who runs and how many tokens: vLLM v1's unified token budget.

Running sequences go first, in admission order, each taking what it still needs
(1 token for a decode, a chunk for an unfinished prompt) from `max_num_batched_tokens`;
when KV blocks run out the most recently admitted one is preempted by recompute.
Waiting sequences are then admitted FIFO while budget, blocks and data-plane slots
last. The BlockManager hands out blocks; the PlanBuilder encodes the decision as a
StepPlan; `postprocess` takes the data plane's StepResult back.

Parallel samples (n > 1): the request's later samples wait until sample 0's prompt is
computed (`Sequence.leader`), then admission finds its full prompt blocks in the
prefix cache, so the samples share them (ref counts) and each computes only the tail
of the prompt that does not fill a block. A sequence that still wants prompt logprobs
skips the prefix cache: a cache hit would leave those tokens' logits uncomputed.

Slot reuse: a slot released since the last plan (finished, aborted, preempted) goes
into the next plan's `drop_slots` and may be given to a new sequence in that same plan:
the data plane applies a plan's drops before its new entries.

Overlap (one step ahead): `schedule()` may plan step N+1 before N's result is back. A
step that samples leaves a pending token (`Sequence.num_pending_tokens`): the next plan
decodes it from the data plane's slot without its id, with a KV slot reserved for it.
Plans in flight are kept (`in_flight`) with who sat at each slot, so `postprocess` gives
each result row to the sequence it was sampled for even if that slot changed hands since;
a token sampled for a sequence that finished meanwhile is discarded (`num_discarded_tokens`).
What may not run ahead: a sequence whose pending token is its last by length (nothing is
planned for it), and a preempted one with a token in flight (its prefill needs the id).
Prefix-cache hashes cover known tokens only, so a discarded token never enters one.

Structured output: a constrained sequence (`Sequence.grammar`) is planned only when none of
its tokens is in flight, since its allowed-token bitmask, filled here from its matcher,
depends on every token before; so under overlap it samples every other step while the
unconstrained ones never wait (docs/structured_output.md). postprocess advances its
matcher, and a matcher that accepted a stop token ends it.

Speculative decoding (controlplane/core/speculative.py, docs/speculative.md): a sequence that may
speculate is likewise planned only with no token in flight; then its last token and the n-gram
proposer's drafts run as one entry that samples every position, postprocess keeps the drafts the
samples confirm, and the KV of the rejected ones is taken back: from the BlockManager (trailing blocks
freed) and from the data plane (the next plan's rewind). Drafts are never in token_ids, so never in a
prefix-cache hash.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from dataclasses import dataclass

import structlog

from controlplane.core.block_manager import BlockManager
from controlplane.core.plan_builder import PlanBuilder, StepRuns
from controlplane.core.sequence import FinishReason, Sequence, SequenceStatus
from controlplane.core.speculative import SpeculativeConfig, Speculator
from controlplane.structured.grammar_state import BitmaskFiller, add_grammar_masks
from proto.step import StepPlan, StepResult

log = structlog.get_logger("controlplane.core.scheduler")


def _arrival(seq: Sequence) -> int:
    return seq.arrival


@dataclass(slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int  # data-plane batch slots
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_seq_len(self) -> int:
        # A sequence longer than the whole KV cache would preempt itself forever, so it stops
        # there even when the model allows more (validation keeps requests within both).
        return min(self.max_model_len, self.num_blocks * self.block_size)


@dataclass(slots=True)
class InFlightStep:
    """A plan sent whose result is not back yet, and who sat at each slot when it was built."""

    plan: StepPlan
    seq_at_slot: list[Sequence | None]
    runs: StepRuns

    @property
    def run_starts(self) -> list[int]:
        return self.runs.starts


class SlotTable:
    """The data plane's batch slots: who sits where, and which releases the next plan must announce."""

    def __init__(self, num_slots: int):
        self.reset(num_slots)

    def reset(self, num_slots: int) -> None:
        """All slots empty and nothing to announce: a new data-plane stream starts from an empty batch."""
        self.seqs: list[Sequence | None] = [None] * num_slots
        self.free = list(range(num_slots))  # a heap: lowest slot first keeps the batch compact
        self.pending_drops: list[int] = []
        self.pending_rewinds: list[tuple[int, int]] = []  # (slot, rejected drafts' tokens) for the next plan

    def has_free(self) -> bool:
        return bool(self.free)

    def assign(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self.free)
        self.seqs[seq.slot] = seq

    def release(self, seq: Sequence) -> None:
        assert self.seqs[seq.slot] is seq
        self.seqs[seq.slot] = None
        heapq.heappush(self.free, seq.slot)
        self.pending_drops.append(seq.slot)
        seq.slot = None
        seq.num_blocks_sent = 0
        seq.last_token_on_device = False

    def take_drops(self) -> list[int]:
        drops, self.pending_drops = self.pending_drops, []
        return drops


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.plan_builder = PlanBuilder(config.eos_token_ids)
        self.slots = SlotTable(config.max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.seqs: dict[str, Sequence] = {}  # unfinished, by id
        self._eos_token_ids = frozenset(config.eos_token_ids)
        self._arrivals = itertools.count()
        self.num_preemptions = 0  # over the scheduler's life, for tests and metrics
        self.max_seq_len = config.max_seq_len  # read per sequence per step: not a property here
        self.num_discarded_tokens = 0  # sampled for a sequence that had finished by then (overlap, aborts)
        self.in_flight: deque[InFlightStep] = deque()  # oldest first
        # priority scheduling (a sequence added with an order offset): waiting and running stay sorted by
        # arrival, so admission takes the lowest key first and preemption pops the highest
        self.ordered = False
        self.num_constrained = 0  # unfinished sequences under a grammar: 0 skips the bitmask pass
        self.bitmask_filler = BitmaskFiller()
        self.speculator = Speculator(SpeculativeConfig())  # off unless the caller sets a method

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def seq_at_slot(self, slot: int) -> Sequence | None:
        return self.slots.seqs[slot]

    def add(self, seq: Sequence, order_offset: int = 0) -> None:
        """order_offset > 0 (priority scheduling): seq is ordered, in the waiting queue and for preemption,
        as if it had arrived that many arrivals later."""
        assert seq.status is SequenceStatus.WAITING and seq.seq_id not in self.seqs
        assert seq.num_tokens < self.max_seq_len, "validation must reject prompts this long"
        seq.arrival = next(self._arrivals) + order_offset
        seq.stop_ids = frozenset(seq.sampling.stop_token_ids) | (
            frozenset() if seq.sampling.ignore_eos else self._eos_token_ids)
        self.seqs[seq.seq_id] = seq
        self.num_constrained += seq.grammar is not None
        self.ordered = self.ordered or order_offset != 0
        if self.ordered:
            bisect.insort(self.waiting, seq, key=_arrival)  # ahead of lower-priority arrivals
        else:
            self.waiting.append(seq)

    def remove_all(self) -> list[Sequence]:
        """Takes every unfinished sequence out, in arrival order, waiting with no blocks or slot (for another
        data plane to adopt); their slots are dropped in the next plan. Only with no step in flight."""
        assert not self.in_flight, "a step in flight would still write to these sequences"
        moved = len(self.running)
        while self.running:
            self._preempt(self.running.pop())
        self.num_preemptions -= moved  # moved, not preempted for want of blocks
        seqs = sorted(self.seqs.values(), key=_arrival)
        self.waiting.clear()
        self.seqs.clear()
        self.num_constrained = 0  # their matchers go with them
        return seqs

    def abort(self, seq_id: str) -> Sequence | None:
        seq = self.seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retires seq now: frees its blocks, and its slot is dropped in the next plan."""
        assert self.seqs.pop(seq.seq_id) is seq, f"{seq.seq_id} is not unfinished here"
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.slots.release(seq)
        else:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.num_constrained -= seq.grammar is not None

    def reset_dataplane(self, num_blocks: int | None = None, max_num_seqs: int | None = None,
                        max_num_batched_tokens: int | None = None) -> None:
        """The data plane lost its batch and KV cache (its Step stream broke): every running
        sequence is preempted by recompute and waits again, with every other waiting one, in
        admission order; the prefix cache is emptied (its blocks' KV is gone). The tokens stay:
        re-prefilling them gives the data plane back what it held. Capacities may change
        with a new data plane (the caller checked they still honour what was promised); the
        slot table and the block manager start empty, so the preemptions' drops are not sent."""
        self.in_flight.clear()  # their results never come: the tokens are recomputed
        for seq in self.seqs.values():
            seq.num_pending_tokens = 0
            seq.spec_drafts = None
        for seq in self.running:
            self._preempt(seq)  # counted, and kept for usage: its first prefix-cache hit stays
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.arrival))
        self.running = []
        cfg = self.config
        cfg.num_blocks = num_blocks or cfg.num_blocks
        cfg.max_num_seqs = max_num_seqs or cfg.max_num_seqs
        cfg.max_num_batched_tokens = max_num_batched_tokens or cfg.max_num_batched_tokens
        self.slots.reset(cfg.max_num_seqs)
        self.block_manager.reset(cfg.num_blocks)
        self.max_seq_len = cfg.max_seq_len

    def schedule(self) -> StepPlan | None:
        """Plans one step; None when nothing can run (pending drops then ride on the next plan)."""
        runs = StepRuns()
        budget = self._schedule_running(runs, self.config.max_num_batched_tokens)
        while self.waiting and budget > 0 and self.slots.has_free():
            if self._waits_for_leader(self.waiting[0]) or self.waiting[0].num_pending_tokens:
                break  # a step or two at most: the leader's prompt is being computed, or the token in flight comes
            num_tokens = self._admit(self.waiting[0], budget, runs)
            if not num_tokens:
                break  # the oldest waits for blocks; later arrivals must not overtake it
            budget -= num_tokens
        if not runs:
            return None
        rewinds, self.slots.pending_rewinds = self.slots.pending_rewinds, []
        plan = self.plan_builder.build(self.slots.take_drops(), runs, rewinds)
        if self.num_constrained:
            add_grammar_masks(plan, runs.slots, runs.flags, self.slots.seqs, self.bitmask_filler)
        self.in_flight.append(InFlightStep(plan, list(self.slots.seqs), runs))
        return plan

    def _schedule_running(self, runs: StepRuns, budget: int) -> int:
        """Gives each running sequence, in admission order, what it still needs; returns the budget left."""
        block_size, max_seq_len = self.config.block_size, self.max_seq_len
        spec = self.speculator if self.speculator.config.enabled else None
        num_running = len(self.running)
        # a preemption pops from the end of running, the sequences this loop has not reached yet
        for seq in self.running:
            if budget <= 0:
                break
            start = seq.num_computed_tokens
            num_tokens = len(seq.token_ids) + seq.num_pending_tokens
            if spec is not None and (seq.spec_drafts is not None or spec.wants(seq, num_running)):
                if seq.num_pending_tokens:
                    continue  # its drafts follow the token in flight
                if start == num_tokens - 1 and budget > 1:  # a decode: drafts may follow its last token
                    room = min(seq.max_num_tokens, max_seq_len) - num_tokens - 1
                    drafts = spec.drafts(seq, min(budget - 1, room))
                    # drafts never preempt anyone: short of blocks for them, the sequence decodes one token
                    if drafts and self.block_manager.ensure_slots(seq, num_tokens + len(drafts)):
                        self._take_speculative(seq, drafts, runs)
                        budget -= 1 + len(drafts)
                        continue
            if seq.num_pending_tokens and (num_tokens >= seq.max_num_tokens or num_tokens >= max_seq_len
                                           or seq.grammar is not None):
                continue  # a step in flight samples its last token by length, or the mask needs it
            n = min(num_tokens - start, budget)
            assert n > 0, f"{seq.seq_id} is running with nothing to compute"
            # most decodes fit in the last block: only a block boundary asks the BlockManager
            if start + n > len(seq.block_table) * block_size and not self._reserve_or_preempt(seq, n):
                break  # seq preempted itself; everything after it already was
            self._take(seq, n, runs, is_new=False)
            budget -= n
        return budget

    def postprocess(self, plan: StepPlan, result: StepResult) -> list[tuple[Sequence, int]]:
        """Takes the oldest plan in flight's result: appends each sampled token to its sequence and finishes
        those that stop; returns (seq, token) in result order, without the tokens discarded."""
        if not self.in_flight or self.in_flight[0].plan.step_id != plan.step_id:
            oldest = self.in_flight[0].plan.step_id if self.in_flight else None
            raise ValueError(f"postprocess of plan {plan.step_id}, but the oldest plan in flight is {oldest}")
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for plan {plan.step_id}")
        seq_at_slot = self.in_flight.popleft().seq_at_slot
        out: list[tuple[Sequence, int]] = []
        finished, max_seq_len = SequenceStatus.FINISHED, self.max_seq_len
        rows = zip(result.slots.tolist(), result.token_ids.tolist())
        for slot, token in rows:
            seq = seq_at_slot[slot]
            if seq is None:
                raise ValueError(f"result {result.step_id} has a token for slot {slot}, empty in that plan")
            seq.num_pending_tokens -= 1
            if seq.spec_drafts is not None:  # this row and the next len(drafts) are its samples
                self._take_speculative_result(seq, [token] + [t for _, t in itertools.islice(rows, len(seq.spec_drafts))], out)
                continue
            if seq.status is finished:
                self.num_discarded_tokens += 1  # aborted, or stopped by the token before
                continue
            ids = seq.token_ids
            ids.append(token)
            seq.last_token_on_device = seq.slot is not None  # not when preempted since
            if seq.grammar is not None and self._grammar_stops(seq, token):
                out.append((seq, token))
                continue
            # most tokens stop nothing: _stop_reason only for those that might
            if token in seq.stop_ids or len(ids) >= seq.max_num_tokens or len(ids) >= max_seq_len:
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason)
            out.append((seq, token))
        return out

    def _take_speculative(self, seq: Sequence, drafts: list[int], runs: StepRuns) -> None:
        """Schedules seq's last token and its drafts as one entry that samples every position (blocks reserved)."""
        self.block_manager.register_full_blocks(seq, len(seq.token_ids))  # known tokens only, never drafts
        runs.add_speculative(seq, seq.num_computed_tokens, drafts)
        seq.num_computed_tokens += 1 + len(drafts)
        seq.num_pending_tokens = 1
        seq.spec_drafts = drafts

    def _take_speculative_result(self, seq: Sequence, sampled: list[int], out: list[tuple[Sequence, int]]) -> None:
        """Appends what the drafts' samples accept; takes back the KV of the rejected drafts."""
        drafts, seq.spec_drafts = seq.spec_drafts, None
        if seq.status is SequenceStatus.FINISHED:
            self.num_discarded_tokens += len(sampled)
            return
        accepted = self.speculator.accept(seq, drafts, sampled)
        rejected = len(drafts) + 1 - len(accepted)
        seq.last_token_on_device = False  # several rows sampled at its slot: the next step sends the id
        if rejected and seq.slot is not None:
            seq.num_computed_tokens -= rejected
            self.block_manager.truncate(seq, seq.num_computed_tokens)
            seq.num_blocks_sent = min(seq.num_blocks_sent, len(seq.block_table))
            self.slots.pending_rewinds.append((seq.slot, rejected))
        ids = seq.token_ids
        for i, token in enumerate(accepted):
            ids.append(token)
            out.append((seq, token))
            if token in seq.stop_ids or len(ids) >= seq.max_num_tokens or len(ids) >= self.max_seq_len:
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason)
                    self.num_discarded_tokens += len(accepted) - 1 - i
                    return

    def _grammar_stops(self, seq: Sequence, token: int) -> bool:
        """Advances seq's matcher by its new token; True when that ended seq (the grammar is done)."""
        if not seq.grammar.accept(token):
            # the data plane samples inside the mask, so this is a bug or a vocabulary mismatch
            log.error("grammar refused a sampled token; ending the sequence", token=token, seq_id=seq.seq_id)
            self.finish(seq, FinishReason.ABORT)
            return True
        if seq.grammar.is_terminated:  # it accepted a stop token (EOS, even under ignore_eos)
            seq.stop_token_id = token
            self.finish(seq, FinishReason.STOP)
            return True
        return False

    def check_invariants(self) -> None:
        """For tests: blocks and slots agree with the live sequences."""
        self.block_manager.check_invariants([s.block_table for s in self.seqs.values()])
        assert sorted(self.slots.free + [s.slot for s in self.running]) == list(range(self.config.max_num_seqs))
        assert all(self.slots.seqs[s.slot] is s for s in self.running)
        assert all(s.num_blocks_sent == len(s.block_table) for s in self.running), "blocks not sent"
        assert all(not s.block_table and s.slot is None for s in self.waiting)
        assert all(0 <= s.num_pending_tokens <= len(self.in_flight) for s in self.seqs.values())

    def _reserve_or_preempt(self, seq: Sequence, n: int) -> bool:
        while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.slots.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.ordered:
            bisect.insort(self.waiting, seq, key=_arrival)
        else:
            self.waiting.appendleft(seq)

    @staticmethod
    def _waits_for_leader(seq: Sequence) -> bool:
        """A later sample waits while its leader runs with its prompt not yet all computed."""
        leader = seq.leader
        return (leader is not None and leader.status is SequenceStatus.RUNNING
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def _admit(self, seq: Sequence, budget: int, runs: StepRuns) -> int:
        """Admits seq with a first chunk into runs; returns its number of tokens, 0 when seq waits for blocks."""
        num_cached = 0 if seq.needs_prompt_logprobs else self.block_manager.allocate_prefix(seq)
        n = min(seq.num_tokens - num_cached, budget)
        if not self.block_manager.ensure_slots(seq, num_cached + n):
            if seq.block_table:
                self.block_manager.free(seq)
            return 0
        self.waiting.popleft()
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = num_cached
        seq.num_computed_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        self.slots.assign(seq)
        if self.ordered:
            bisect.insort(self.running, seq, key=_arrival)
        else:
            self.running.append(seq)
        return self._take(seq, n, runs, is_new=True)

    def _take(self, seq: Sequence, n: int, runs: StepRuns, is_new: bool) -> int:
        """Schedules seq's next n tokens into runs; returns n."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        assert end <= self.max_seq_len
        # registered now, not after the step ran: a sequence admitted later in this same step
        # may hit these blocks, because the data plane writes a layer's KV for the whole
        # batch before any attention of that layer reads it. A block holding a pending
        # token waits for a later step: its hash needs the token's id.
        num_known = len(seq.token_ids)
        known = end if end < num_known else num_known
        if n > 1 or known % self.config.block_size == 0:  # a decode fills a block at a boundary only
            self.block_manager.register_full_blocks(seq, known)
        seq.num_computed_tokens = end
        num_pending = seq.num_pending_tokens
        samples = end == num_known + num_pending
        # a decode of the token the data plane sampled at this slot (in flight, or the last appended) needs no id
        on_device = n == 1 and samples and (num_pending > 0 or seq.last_token_on_device)
        seq.num_pending_tokens = num_pending + samples
        runs.add(seq, start, n, is_new, samples, on_device)
        return n

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        num_tokens = len(seq.token_ids)
        # the data plane bans these tokens until min_tokens outputs exist; checked here too so both agree
        if token in seq.stop_ids and num_tokens - seq.num_prompt_tokens > seq.sampling.min_tokens:
            seq.stop_token_id = token
            return FinishReason.STOP
        if num_tokens >= seq.max_num_tokens or num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None
