"""Engine: the control plane's step loop, on its own thread.

Each step: take in new requests and aborts → Scheduler.schedule() → send the plan to
the data plane → take back the oldest result → Scheduler.postprocess() appends sampled
tokens → detokenise, check stop strings, stream deltas to each request's OutputStream.
With overlap (the default) the result taken back is the previous step's: the data plane
already has this step's plan while the control plane handles that result, so stop
conditions act one step late and a sequence that stops may cost one discarded token
(Scheduler.num_discarded_tokens), never a wrong one in the output. Only this thread touches
the scheduler and sequences; the gRPC servicer talks to it through submit()/abort().
A request of n samples is n Sequences (the Scheduler's `leader` makes them share the
prompt's KV blocks) and one stream; each delta says which sample it belongs to.

When the step stream breaks, nothing is failed: the scheduler re-queues every sequence
for recompute (`Scheduler.reset_dataplane`), and the loop reconnects through
`reconnect.DataPlaneReconnector` while it goes on taking requests and aborts; clients see
a pause. Only past the reconnect timeout do the requests held fail, with UNAVAILABLE.
Behind a Router (several data planes, router.py), a lost engine hands its requests to
the Router at once instead (`fleet.rehome`), which places them on the data planes that
still answer; this engine then reconnects empty and rejoins.
"""
from __future__ import annotations

import itertools
import operator
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from controlplane.link.dataplane_client import DataPlaneClient, DataPlaneUnavailable
from controlplane.serving.detokenizer import BatchDetokenizer, IncrementalDetokenizer
from controlplane.serving.engine_observer import EngineObserver
from controlplane.serving.logprobs import PositionLogprobs, prompt_logprobs, sampled_logprobs
from controlplane.serving.outputs import Deliveries, EngineFailure, OutputStream, RequestOutput, Usage

__all__ = ["Engine", "EngineFailure", "OutputStream", "RequestOutput", "Usage"]
from controlplane.link.reconnect import DataPlaneReconnector
from controlplane.core.scheduler import Scheduler
from controlplane.core.sequence import FinishReason, SamplingOptions, Sequence, new_samples
from controlplane.serving.tokenizer import Tokenizer
from proto.step import StepResult

log = structlog.get_logger("controlplane.serving.engine")
_request_id = operator.attrgetter("request_id")


@dataclass(slots=True)
class _Request:
    """A request's n samples (sample i: seqs[i], detokenizers[i]) and the stream they share."""

    request_id: str
    seqs: list[Sequence]
    stream: OutputStream
    detokenizers: list[IncrementalDetokenizer]
    arrival_s: float
    num_unfinished: int
    # computed, not yet sent: they go with sample 0's next delta
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)

    def take_prompt_logprobs(self) -> list[PositionLogprobs] | None:
        taken, self.prompt_logprobs = self.prompt_logprobs, []
        return taken or None


class Engine:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, dataplane: DataPlaneClient,
                 reconnector: DataPlaneReconnector, overlap: bool = True, priority_aging_requests: int = 0):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.dataplane = dataplane
        self.overlap = overlap
        self._sent_s: deque[float] = deque()  # when each plan in flight was sent
        self._deliveries = Deliveries()
        self._detokenizer = BatchDetokenizer(tokenizer)
        self.reconnector = reconnector
        self.num_running_requests = 0  # requests with a sample in a batch slot; read by admission control
        self._inbox: queue.Queue = queue.Queue()
        self._wakeup = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.num_steps = 0
        self.observer = EngineObserver()  # metrics, slot logs and health replace it
        self.fleet = None  # the Router when there are several data planes (rehome, request_ended)
        self.priority_aging_requests = priority_aging_requests  # 0 = fcfs (Sequence.priority ignored)
        self._evacuating = False  # drain --move: finish the steps in flight, then hand every request over

    # --- called from other threads -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout_s)
        self._close_stream()

    @property
    def num_discarded_tokens(self) -> int:
        """Tokens sampled for a sequence that had stopped or was aborted by then; none reached a client."""
        return self.scheduler.num_discarded_tokens

    @property
    def dataplane_connected(self) -> bool:
        return self.reconnector.connected

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}-{time.time_ns() % 10**9:09d}"

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions,
               stream: OutputStream, priority: int = 0) -> None:
        self._inbox.put(("add", request_id, prompt_token_ids, sampling, stream, priority))
        self._wakeup.set()

    def adopt(self, request: "_Request") -> None:
        """Takes over a request another engine gave up (its data plane left): its tokens are re-prefilled here."""
        self._inbox.put(("adopt", request))
        self._wakeup.set()

    def evacuate(self) -> None:
        """Hands every request to the fleet once the steps in flight are back (drain with --move)."""
        self._inbox.put(("evacuate",))
        self._wakeup.set()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def abort_all(self) -> None:
        """Ends every request now, each with a last output of finish_reason "abort" (shutdown's grace is over)."""
        self._inbox.put(("abort_all",))
        self._wakeup.set()

    # --- the engine thread -------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                self._deliveries.flush()  # abort_all's last outputs
                return
            if item[0] == "add":
                _, request_id, prompt_ids, sampling, stream, priority = item
                if request_id in self._requests:
                    stream.put(EngineFailure(f"request id {request_id!r} is already in use", "ALREADY_EXISTS"))
                    continue
                if self.reconnector.failing_fast:
                    stream.put(EngineFailure(self.reconnector.unavailable_message()))
                    continue
                request = self._new_request(request_id, prompt_ids, sampling, stream)
                self._requests[request_id] = request
                for seq in request.seqs:
                    seq.priority = priority
                    self._add_seq(seq)
                self.observer.request_added(request_id, len(request.seqs))
            elif item[0] == "adopt":
                request = item[1]
                self._requests[request.request_id] = request
                for seq in request.seqs:
                    if not seq.is_finished:
                        self._add_seq(seq)
                self.observer.request_adopted(request.request_id, request.num_unfinished)
            elif item[0] == "evacuate":
                self._evacuating = True
            elif item[0] == "abort_all":
                for request_id, request in list(self._requests.items()):
                    for seq, detok in zip(request.seqs, request.detokenizers):
                        if self.scheduler.abort(seq.seq_id) is not None:
                            self._send(request, RequestOutput(request_id, detok.finish(), [], FinishReason.ABORT.value,
                                                              self._usage(seq), seq.index))
                self._ended_all()
            else:
                # the caller is gone (cancelled or deadline): free the blocks, tell no one
                request = self._requests.pop(item[1], None)
                if request is not None:
                    self._abort_samples(request)
                    self.observer.request_dropped(item[1], FinishReason.ABORT.value)
                    self._ended(item[1])

    def _add_seq(self, seq: Sequence) -> None:
        # priority order: as if it arrived `priority` × aging later, so later arrivals overtake it boundedly
        self.scheduler.add(seq, seq.priority * self.priority_aging_requests)

    def _ended(self, request_id: str) -> None:
        if self.fleet is not None:
            self.fleet.request_ended(request_id)

    def _ended_all(self) -> None:
        for request_id in list(self._requests):
            self._ended(request_id)
        self._requests.clear()

    def take_requests(self) -> list[_Request]:
        """Every request, out of this engine (engine thread, no step in flight): their sequences wait
        with no blocks, ready to be adopted by another engine."""
        assert not self.scheduler.in_flight, "steps in flight still write to these sequences"
        self.scheduler.remove_all()
        requests, self._requests = list(self._requests.values()), {}
        self.num_running_requests = 0
        return requests

    def _rehome(self) -> bool:
        """Hands every request to the fleet's other data planes; False when none would take them."""
        return self.fleet is not None and bool(self._requests) and self.fleet.rehome(self)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.reconnector.connected:
                self._reconnect()
                continue
            if self._evacuating and not self.scheduler.in_flight:
                self._evacuating = False
                self._rehome()
            if not self.scheduler.has_unfinished() and not self.scheduler.in_flight:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
                self.reconnector.progressed()
            except DataPlaneUnavailable as e:
                self._dataplane_lost(str(e))
            except Exception as e:  # a bug must not leave clients hanging
                log.exception("engine step failed")
                self._fail_all(f"internal error in the control plane: {e}", "INTERNAL")

    def _dataplane_lost(self, reason: str) -> None:
        """Keeps every request: the data plane forgot its batch and KV, so all of it is recomputed later."""
        self._close_stream()
        self.scheduler.reset_dataplane()
        self.num_running_requests = 0
        self.reconnector.lost(reason)
        self.observer.dataplane_lost(reason)
        self._evacuating = False
        if self._rehome():
            log.warning("data plane lost: its requests moved to the other data planes", reason=reason,
                        dataplane=self.dataplane.target)
            return
        log.warning("data plane lost: holding the requests and reconnecting", reason=reason,
                    num_requests=len(self._requests), timeout_s=self.reconnector.timeout_s)

    def _reconnect(self) -> None:
        """One pass of the loop while the data plane is away: give up on the requests past the timeout,
        else try to reconnect when the backoff says so, else wait (new requests and aborts wake it)."""
        if self._requests and self._rehome():
            return  # another data plane came up meanwhile
        if self._requests and self.reconnector.should_give_up():
            self._fail_all(self.reconnector.give_up_message())
            self.reconnector.gave_up()
        info = self.reconnector.attempt()
        if info is None:
            self._wakeup.wait(min(self.reconnector.seconds_to_next_attempt(), 0.5))
            self._wakeup.clear()
            return
        self.scheduler.reset_dataplane(info.num_kv_blocks, info.max_num_seqs, info.max_num_batched_tokens)
        self.observer.dataplane_reconnected()
        if not self.scheduler.has_unfinished():
            self.reconnector.progressed()  # nothing to prove the new stream with: the outage is over

    def step(self) -> None:
        """Plans and sends a step, then takes back the oldest result; with overlap, while a plan was sent
        this step, the one before it stays in flight (so the data plane never waits for this thread)."""
        plan = None if self._evacuating else self.scheduler.schedule()
        if plan is not None:
            self.dataplane.send(plan)
            self._sent_s.append(time.monotonic())
        if len(self.scheduler.in_flight) > (1 if self.overlap and plan is not None else 0):
            self._take_result(self.dataplane.receive())
        elif plan is None:
            self._wakeup.wait(0.01)
            self._wakeup.clear()

    def _take_result(self, result: StepResult) -> None:
        step = self.scheduler.in_flight[0]
        plan, seq_at_slot = step.plan, step.seq_at_slot
        self.num_steps += 1
        self.observer.step_done(plan, time.monotonic() - self._sent_s.popleft(), seq_at_slot)
        # logprobs first: they read the sequences' counters as the plan left them
        if len(plan.prompt_logprob_counts):
            for seq, entries in prompt_logprobs(plan, result, seq_at_slot.__getitem__, step.run_starts).items():
                if (request := self._requests.get(seq.request_id)) is not None:
                    request.prompt_logprobs += entries
        token_logprobs = (sampled_logprobs(result, [seq_at_slot[s] for s in result.slots.tolist()])
                          if len(result.logprob_rows) else {})
        self.num_running_requests = len(set(map(_request_id, self.scheduler.running)))
        sampled: list[tuple[_Request, Sequence, int, IncrementalDetokenizer]] = []
        detokenizer_items: list[tuple[IncrementalDetokenizer, int | None, bool]] = []
        requests = self._requests
        for seq, token in self.scheduler.postprocess(plan, result):
            if (request := requests.get(seq.request_id)) is not None:
                detokenizer, sampling = request.detokenizers[seq.index], seq.sampling
                sampled.append((request, seq, token, detokenizer))
                # the EOS or stop token that ended the sample stays out of the text unless asked for (as in vLLM)
                text_id = token if seq.stop_token_id is None or sampling.include_stop_str_in_output else None
                detokenizer_items.append((detokenizer, text_id,
                                          len(seq.token_ids) - seq.num_prompt_tokens > sampling.min_tokens))
        self._emit_all(sampled, self._detokenizer.add(detokenizer_items), token_logprobs)
        self._deliveries.flush()

    def _emit_all(self, sampled: list[tuple[_Request, Sequence, int, IncrementalDetokenizer]], texts: list[str],
                  token_logprobs: dict[Sequence, PositionLogprobs]) -> None:
        """Sends each sampled token's delta; most are a token and its text of a sample that goes on."""
        deliver, output_sent = self._deliveries.put, self.observer.output_sent
        for (request, seq, token, detokenizer), text in zip(sampled, texts):
            if (seq.finish_reason is not None or detokenizer.stopped or request.prompt_logprobs
                    or (token_logprobs and seq in token_logprobs)):
                self._emit(request, seq, token, text, [token_logprobs[seq]] if seq in token_logprobs else None)
                continue
            output = RequestOutput(request.request_id, text, [token], None, None, seq.index)
            deliver(request.stream, output)
            output_sent(output)

    def _emit(self, request: _Request, seq: Sequence, token: int, text: str,
              logprobs: list[PositionLogprobs] | None) -> None:
        """Finishes one sample on a stop string, and sends its delta."""
        detokenizer = request.detokenizers[seq.index]
        if detokenizer.stopped and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP)
        prompt_lps = request.take_prompt_logprobs() if seq.index == 0 else None
        if seq.finish_reason is not None:
            text = text if detokenizer.stopped else text + detokenizer.finish()
            self._send(request, RequestOutput(request.request_id, text, [token], str(seq.finish_reason.value),
                                              self._usage(seq), seq.index, logprobs, prompt_lps))
            request.num_unfinished -= 1
            if request.num_unfinished == 0:
                del self._requests[request.request_id]
                self._ended(request.request_id)
        else:
            self._send(request, RequestOutput(request.request_id, text, [token], index=seq.index,
                                              logprobs=logprobs, prompt_logprobs=prompt_lps))

    def _new_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingOptions,
                     stream: OutputStream) -> _Request:
        seqs = new_samples(request_id, prompt_ids, sampling)
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=sampling.skip_special_tokens,
                                               stop=sampling.stop,
                                               include_stop_str_in_output=sampling.include_stop_str_in_output)
                        for _ in seqs]
        return _Request(request_id, seqs, stream, detokenizers, time.monotonic(), num_unfinished=len(seqs))

    def _abort_samples(self, request: _Request) -> None:
        for seq in request.seqs:
            self.scheduler.abort(seq.seq_id)  # a no-op for a sample that already finished

    def _send(self, request: _Request, output: RequestOutput) -> None:
        self._deliveries.put(request.stream, output)  # delivered at the end of the step or drain
        self.observer.output_sent(output)

    def _usage(self, seq: Sequence) -> Usage:
        return Usage(seq.num_prompt_tokens, seq.num_completion_tokens, seq.num_cached_prompt_tokens)

    def _fail_all(self, message: str, code: str = "UNAVAILABLE") -> None:
        log.error("failing all requests", reason=message, num_requests=len(self._requests))
        self._deliveries.flush()  # what was produced before the failure goes first
        for request_id, request in list(self._requests.items()):
            self._abort_samples(request)
            request.stream.put(EngineFailure(message, code))
            self.observer.request_dropped(request_id, "error")
        self._ended_all()
        self._close_stream()
        self.scheduler.reset_dataplane()  # the next stream starts from an empty batch: no drops to announce
        self.num_running_requests = 0

    def _close_stream(self) -> None:
        """Nothing stays in flight: a plan sent on the old stream never answers (the scheduler forgets it too)."""
        self.dataplane.close_stream()
        self._sent_s.clear()
