"""EngineTelemetry: turns the Engine's hooks into Prometheus metrics, slot logs and health reports.

Metric names follow vLLM's (`vllm:` becomes `nanoplane:`), so existing dashboards
port by a prefix change; docs/operations.md lists them. The slot log is what joins
the two planes' logs: the data plane sees only slots and step ids, so this side logs
which request enters and leaves which slot in which step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

from controlplane.serving.engine import RequestOutput
from controlplane.serving.engine_observer import EngineObserver
from controlplane.ops.metrics import Metrics
from controlplane.core.scheduler import Scheduler
from controlplane.core.sequence import Sequence
from proto.step import StepPlan

log = structlog.get_logger("controlplane.serving.engine")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class _SampleTiming:
    first_token_s: float
    last_token_s: float
    num_tokens: int = 0


@dataclass(slots=True)
class _Timing:
    """One request's clock; a request of n samples has n sequences that finish one by one."""

    arrival_s: float
    num_unfinished: int
    scheduled_s: float | None = None
    first_token_s: float | None = None
    samples: dict[int, _SampleTiming] = field(default_factory=dict)


class EngineTelemetry(EngineObserver):
    def __init__(self, scheduler: Scheduler, registry: Metrics,
                 on_dataplane_lost: Callable[[str], None] = lambda message: None,
                 on_dataplane_back: Callable[[], None] = lambda: None):
        self.scheduler = scheduler
        self.registry = registry
        self._on_dataplane_lost = on_dataplane_lost
        self._on_dataplane_back = on_dataplane_back
        self._timings: dict[str, _Timing] = {}
        # (request id, sample) each data-plane slot holds, as the data plane knows it
        self._slot_owner: dict[int, tuple[str, int]] = {}
        self._define_metrics(registry)

    def _define_metrics(self, r: Metrics) -> None:
        s, blocks = self.scheduler, self.scheduler.block_manager
        r.gauge("nanoplane:num_requests_running", "Requests holding a batch slot.", lambda: s.num_running)
        r.gauge("nanoplane:num_requests_waiting", "Requests waiting for a slot or KV blocks.",
                lambda: s.num_waiting)
        r.gauge("nanoplane:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
                lambda: 1.0 - blocks.num_free_blocks / blocks.num_blocks)
        r.counter_reader("nanoplane:num_preemptions_total", "Sequences preempted (by recompute) since start.",
                         lambda: s.num_preemptions)
        r.counter_reader("nanoplane:discarded_tokens_total",
                         "Tokens sampled one step ahead for a sequence that had stopped or was aborted; "
                         "never sent to a client.", lambda: s.num_discarded_tokens)
        r.counter_reader("nanoplane:grammar_bitmask_seconds_total",
                         "Seconds the engine thread spent filling structured output's token bitmasks.",
                         lambda: s.bitmask_filler.total_s)
        r.counter_reader("nanoplane:grammar_bitmask_rows_total",
                         "Token bitmasks filled for constrained rows (one per constrained sampled token).",
                         lambda: s.bitmask_filler.num_rows)
        if s.speculator.config.enabled:
            self._define_spec_metrics(r, s.speculator.counters, s.speculator.config.num_speculative_tokens)
        self.prefix_queries = r.counter("nanoplane:prefix_cache_queries_total",
                                        "Tokens looked up in the prefix cache when a sequence was admitted.")
        self.prefix_hits = r.counter("nanoplane:prefix_cache_hits_total",
                                     "Tokens found in the prefix cache when a sequence was admitted.")
        self.prompt_tokens = r.counter("nanoplane:prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = r.counter("nanoplane:generation_tokens_total", "Tokens generated.")
        self.request_success = r.counter("nanoplane:request_success_total",
                                         "Requests finished, by finish reason.", ("finished_reason",))
        self.request_failure = r.counter("nanoplane:request_failure_total",
                                         "Requests failed by an error (the data plane away past the "
                                         "reconnect timeout, an internal error).")
        self.dataplane_losses = r.counter("nanoplane:dataplane_losses_total",
                                          "Times the step stream to the data plane broke.")
        self.dataplane_reconnects = r.counter("nanoplane:dataplane_reconnects_total",
                                              "Times a new step stream was opened after a loss.")
        self.ttft = r.histogram("nanoplane:time_to_first_token_seconds",
                                "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.tpot = r.histogram("nanoplane:time_per_output_token_seconds",
                                "Mean time per generated token after the first, per request.", TPOT_BUCKETS)
        self.e2e = r.histogram("nanoplane:e2e_request_latency_seconds",
                               "Time from arrival to the last output.", REQUEST_BUCKETS)
        self.queue_time = r.histogram("nanoplane:request_queue_time_seconds",
                                      "Time from arrival to the first step that runs the request.",
                                      REQUEST_BUCKETS)
        self.step_duration = r.histogram("nanoplane:step_duration_seconds",
                                         "Data-plane round trip of one step (send plan, run, receive result).",
                                         STEP_BUCKETS)

    # --- EngineObserver ------------------------------------------------------------
    def request_added(self, request_id: str, num_samples: int) -> None:
        self._timings[request_id] = _Timing(arrival_s=time.monotonic(), num_unfinished=num_samples)

    def request_adopted(self, request_id: str, num_unfinished: int) -> None:
        # its first token and queue time were counted where it started; only what is left is counted here
        now = time.monotonic()
        self._timings[request_id] = _Timing(arrival_s=now, num_unfinished=num_unfinished, scheduled_s=now,
                                            first_token_s=now)

    @staticmethod
    def _define_spec_metrics(r: Metrics, counters, num_positions: int) -> None:
        """vLLM's spec_decode series; mean acceptance length = 1 + accepted / drafts (docs/speculative.md)."""
        r.counter_reader("nanoplane:spec_decode_num_drafts_total", "Speculative steps of a sequence (drafts proposed).",
                         lambda: counters.num_drafts)
        r.counter_reader("nanoplane:spec_decode_num_draft_tokens_total", "Draft tokens proposed.",
                         lambda: counters.num_draft_tokens)
        r.counter_reader("nanoplane:spec_decode_num_accepted_tokens_total", "Draft tokens accepted.",
                         lambda: counters.num_accepted_tokens)
        for i in range(num_positions):
            r.labelled({"position": str(i)}).counter_reader(
                "nanoplane:spec_decode_num_accepted_tokens_per_pos_total",
                "Draft tokens accepted at each draft position (0 = the first draft).",
                lambda i=i: counters.accepted_per_position[i] if i < len(counters.accepted_per_position) else 0)

    def step_done(self, plan: StepPlan, duration_s: float, seq_at_slot: list[Sequence | None]) -> None:
        now = time.monotonic()
        self.step_duration.observe(duration_s)
        for slot in plan.drop_slots.tolist():  # the data plane applies drops before new entries
            owner = self._slot_owner.pop(slot, None)
            if owner is not None:
                log.info("sequence left slot", request_id=owner[0], sample=owner[1], slot=slot, step_id=plan.step_id)
        for slot, num_cached in zip(plan.new_slots.tolist(), plan.new_num_cached_tokens.tolist()):
            seq = seq_at_slot[slot]
            if seq is None:
                continue
            self._slot_owner[slot] = (seq.request_id, seq.index)
            log.info("sequence entered slot", request_id=seq.request_id, sample=seq.index, slot=slot,
                     step_id=plan.step_id, num_cached_tokens=num_cached, num_preemptions=seq.num_preemptions)
            self.prefix_queries.inc(seq.num_tokens)
            self.prefix_hits.inc(num_cached)
            timing = self._timings.get(seq.request_id)
            if timing is not None and timing.scheduled_s is None:
                timing.scheduled_s = now - duration_s
                self.queue_time.observe(timing.scheduled_s - timing.arrival_s)
                self.prompt_tokens.inc(seq.num_prompt_tokens)

    def output_sent(self, output: RequestOutput) -> None:
        timing = self._timings.get(output.request_id)
        if timing is None:
            return
        now = time.monotonic()
        if output.token_ids:
            if timing.first_token_s is None:
                timing.first_token_s = now
                self.ttft.observe(now - timing.arrival_s)
            sample = timing.samples.setdefault(output.index, _SampleTiming(now, now))
            sample.last_token_s = now
            sample.num_tokens += len(output.token_ids)
            self.generation_tokens.inc(len(output.token_ids))
        if output.finish_reason is not None:
            self.request_success.labels(finished_reason=output.finish_reason).inc()
            sample = timing.samples.get(output.index)
            if sample is not None and sample.num_tokens > 1:
                self.tpot.observe((sample.last_token_s - sample.first_token_s) / (sample.num_tokens - 1))
            timing.num_unfinished -= 1
            if timing.num_unfinished <= 0:
                del self._timings[output.request_id]
                self.e2e.observe(now - timing.arrival_s)

    def request_dropped(self, request_id: str, reason: str) -> None:
        timing = self._timings.pop(request_id, None)
        if reason == "abort":
            self.request_success.labels(finished_reason="abort").inc()
            if timing is not None:
                self.e2e.observe(time.monotonic() - timing.arrival_s)
        else:
            self.request_failure.inc()

    def dataplane_lost(self, message: str) -> None:
        # the data plane forgets its whole batch with the stream; a new stream starts from empty slots
        self._slot_owner.clear()
        self.dataplane_losses.inc()
        self._on_dataplane_lost(message)

    def dataplane_reconnected(self) -> None:
        self.dataplane_reconnects.inc()
        self._on_dataplane_back()
